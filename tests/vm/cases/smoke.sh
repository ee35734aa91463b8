# Attach a memory device through the module, do I/O, detach.
. "$CASES/lib.bash"
dev=$(attach --name smoke mem:64M)
[ "$dev" = /dev/fuseblk0 ] || fail "device $dev"
[ "$(cat /sys/block/fuseblk0/fuse_blk/state)" = live ] || fail "state"
[ "$(cat /sys/block/fuseblk0/fuse_blk/name)" = smoke ] || fail "name"
[ "$(blockdev --getsize64 "$dev")" = $((64 << 20)) ] || fail "size"
random_file /tmp/data 8
dd if=/tmp/data of="$dev" bs=1M oflag=direct status=none
cmp <(head -c 8M "$dev") /tmp/data || fail "read back"
"$FUSE_BLK" list
detach smoke
[ ! -e "$dev" ] || fail "device still there"
