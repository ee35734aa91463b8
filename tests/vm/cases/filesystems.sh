# ext4 and xfs on module devices: write with checksums, detach, attach
# again (file backend), verify, fsck clean.
. "$CASES/lib.bash"
mkdir -p /tmp/mnt
random_file /tmp/data 32
want=$(sum /tmp/data)

check_fs() {   # fstype mkfs-command fsck-command
    local fstype=$1 mkfs=$2 fsck=$3 image=/tmp/$1.img
    rm -f "$image"; truncate -s 512M "$image"
    dev=$(attach --name "$fstype" --block-size 4096 "file:$image")
    $mkfs "$dev" >/dev/null
    mount -t "$fstype" "$dev" /tmp/mnt
    cp /tmp/data /tmp/mnt/data
    umount /tmp/mnt
    detach "$fstype"
    dev=$(attach --name "$fstype" --block-size 4096 "file:$image")
    mount -t "$fstype" "$dev" /tmp/mnt
    [ "$(sum /tmp/mnt/data)" = "$want" ] || fail "$fstype: checksum after re-attach"
    umount /tmp/mnt
    $fsck "$dev" || fail "$fstype: fsck"
    detach "$fstype"
    rm -f "$image"
}
check_fs ext4 "mkfs.ext4 -q -F" "e2fsck -fn"
check_fs xfs "mkfs.xfs -q -f" "xfs_repair -n"

# ext4 on the memory backend, with 512-byte blocks and two queues.
dev=$(attach --name memfs --queues 2 mem:256M)
mkfs.ext4 -q "$dev"
mount "$dev" /tmp/mnt
cp /tmp/data /tmp/mnt/data
umount /tmp/mnt
mount "$dev" /tmp/mnt
[ "$(sum /tmp/mnt/data)" = "$want" ] || fail "mem: checksum"
umount /tmp/mnt
e2fsck -fn "$dev" || fail "mem: fsck"
detach memfs
