# A read-only device rejects writes.
. "$CASES/lib.bash"
random_file /tmp/ro.img 4
dev=$(attach --name ro --read-only file:/tmp/ro.img)
[ "$(blockdev --getro "$dev")" = 1 ] || fail "not read-only"
if dd if=/dev/zero of="$dev" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
    fail "write succeeded"
fi
cmp <(head -c 4M "$dev") /tmp/ro.img || fail "contents"
detach ro
cmp <(head -c 4M /tmp/ro.img) /tmp/ro.img
