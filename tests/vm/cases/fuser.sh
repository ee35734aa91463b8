# A fuser::Filesystem served through the adapter on a module device.
. "$CASES/lib.bash"
"$VMTEST" fuser 128M > /tmp/fuser.out &
daemon=$!
for _ in $(seq 100); do [ -s /tmp/fuser.out ] && break; sleep 0.1; done
dev=$(cat /tmp/fuser.out)
[ -b "$dev" ] || fail "no device"
mkfs.ext4 -q "$dev"
mkdir -p /tmp/mnt
mount "$dev" /tmp/mnt
random_file /tmp/mnt/data 16
want=$(sum /tmp/mnt/data)
umount /tmp/mnt
mount "$dev" /tmp/mnt
[ "$(sum /tmp/mnt/data)" = "$want" ] || fail "checksum"
umount /tmp/mnt
e2fsck -fn "$dev"
"$VMTEST" destroy 0
wait "$daemon"
