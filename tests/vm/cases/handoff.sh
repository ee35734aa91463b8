# 20 handoffs in a row under a verifying fio load on mounted ext4: zero I/O
# errors, verification clean, fsck clean. Every request goes through the
# daemons (passthrough.sh hands over a passthrough device).
. "$CASES/lib.bash"
image=/tmp/handoff.img
mount_image_device ho "$image" --no-passthrough
start_load /tmp/mnt
for i in $(seq 20); do
    "$FUSE_BLK" handoff ho > /dev/null || fail "handoff $i"
    sleep 0.3
done
stop_load
"$FUSE_BLK" list | grep -q "^ho .*running" || fail "not running after the handoffs"
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck"
no_io_errors
detach ho
