# Online resize on module devices (FUSE_BLK_IOC_RESIZE, `fuse-blk resize`):
# ext4 on an image grown with resize2fs and xfs in memory with xfs_growfs,
# each while fio verifies on it; the kernel's change uevent says RESIZE=1;
# sysfs and lsblk show the size; a mounted device is not shrunk; an image
# grown online is handed over and recovered with its new size.
. "$CASES/lib.bash"
module_offers resize || skip_rest "the module does not offer FUSE_BLK_F_RESIZE"
mkdir -p /tmp/mnt
dmesg_mark=$(dmesg | wc -l)
cleanup() {   # also after a failure: nothing of the case is left
    umount /tmp/mnt 2>/dev/null || true
    detach grow 2>/dev/null || true
    detach growx 2>/dev/null || true
}
trap cleanup EXIT
MiB=$((1 << 20))
sectors() { cat "/sys/block/${1#/dev/}/size"; }
fs_bytes() { df -B1 --output=size /tmp/mnt | tail -n 1 | tr -d ' '; }
# ext4 on an image: grown by 2x online.
rm -f /tmp/grow.img; truncate -s 256M /tmp/grow.img
dev=$(attach --name grow --queues 2 --block-size 4096 file:/tmp/grow.img)
mkfs.ext4 -q "$dev"
mount "$dev" /tmp/mnt
before=$(fs_bytes)
udevadm monitor --kernel --property --subsystem-match=block > /tmp/uevents 2>/dev/null &
monitor=$!
start_load /tmp/mnt
sleep 2
"$FUSE_BLK" resize grow 512M
[ "$(sectors "$dev")" = $((512 * MiB / 512)) ] || fail "sysfs size $(sectors "$dev") after the grow"
[ "$(stat -c %s /tmp/grow.img)" = $((512 * MiB)) ] || fail "the image was not extended"
[ "$(lsblk -bno SIZE "$dev")" = $((512 * MiB)) ] || fail "lsblk: $(lsblk -bno SIZE "$dev")"
resize2fs "$dev" > /dev/null 2>&1 || fail "resize2fs online"
stop_load
sleep 1
kill "$monitor" 2>/dev/null || true
grep -q "RESIZE=1" /tmp/uevents || { cat /tmp/uevents; fail "no change uevent with RESIZE=1"; }
after=$(fs_bytes)
[ "$after" -gt $((before + 200 * MiB)) ] || fail "ext4 grew from $before to $after bytes only"
[ "$(listed grow size)" = $((512 * MiB)) ] || fail "list shows size $(listed grow size)"
if "$FUSE_BLK" resize grow 128M 2>/tmp/err; then fail "shrank a mounted device"; fi
grep -q "in use" /tmp/err || fail "shrink refusal says: $(cat /tmp/err)"
[ "$(sectors "$dev")" = $((512 * MiB / 512)) ] || fail "a refused shrink changed the size"

# The grown device is handed over and recovered with its new size.
"$FUSE_BLK" handoff grow
[ "$(sectors "$dev")" = $((512 * MiB / 512)) ] || fail "size after handoff"
kill -9 "$(daemon_pid grow)"
attach --recover grow file:/tmp/grow.img > /dev/null
umount /tmp/mnt
e2fsck -fn "$dev" > /dev/null || fail "e2fsck after the grow, handoff and recovery"
detach grow
rm -f /tmp/grow.img

# xfs in memory, grown by 2x online; shrunk once unmounted, and what was
# cut off reads as zeros when it grows back.
dev=$(attach --name growx --queues 2 mem:320M)
mkfs.xfs -q -f "$dev"
mount "$dev" /tmp/mnt
before=$(fs_bytes)
start_load /tmp/mnt
sleep 2
"$FUSE_BLK" resize growx 640M
xfs_growfs /tmp/mnt > /dev/null || fail "xfs_growfs"
stop_load
after=$(fs_bytes)
[ "$after" -gt $((before + 250 * MiB)) ] || fail "xfs grew from $before to $after bytes only"
umount /tmp/mnt
xfs_repair -n "$dev" > /dev/null 2>&1 || fail "xfs_repair after the grow"
"$FUSE_BLK" resize growx 64M
[ "$(sectors "$dev")" = $((64 * MiB / 512)) ] || fail "size after the shrink"
"$FUSE_BLK" resize growx 640M
[ "$(dd if="$dev" bs=1M skip=600 count=1 status=none | tr -d '\0' | wc -c)" = 0 ] ||
    fail "the regrown end is not zeros"
detach growx
no_io_errors
