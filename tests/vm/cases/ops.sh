# Discard and write-zeroes reach the handler and read back as zeros; a
# flush (sync) reaches it; FUA writes arrive flagged.
. "$CASES/lib.bash"
log=/tmp/ops.log; rm -f "$log"
"$VMTEST" recorder 64M "$log" > /tmp/recorder.out &
daemon=$!
for _ in $(seq 100); do [ -s /tmp/recorder.out ] && break; sleep 0.1; done
dev=$(cat /tmp/recorder.out)
[ -b "$dev" ] || fail "no device"

head -c 8M /dev/urandom > /tmp/fill
dd if=/tmp/fill of="$dev" bs=1M oflag=direct status=none
blkdiscard --offset 1048576 --length 1048576 "$dev"
blkdiscard -z --offset 3145728 --length 1048576 "$dev"
grep -q "^discard 1048576 1048576$" "$log" || fail "discard did not reach the handler"
grep -q "^write_zeroes 3145728 1048576$" "$log" || fail "write-zeroes did not reach the handler"
cmp -n 1M <(tail -c +1048577 "$dev") /dev/zero || fail "discarded range not zero"
cmp -n 1M <(tail -c +3145729 "$dev") /dev/zero || fail "zeroed range not zero"

before=$(grep -c '^flush$' "$log" || true)
dd if=/dev/urandom of="$dev" bs=4096 count=1 status=none
sync "$dev"
after=$(grep -c '^flush$' "$log")
[ "$after" -gt "$before" ] || fail "sync did not flush"

dd if=/dev/urandom of="$dev" bs=4096 count=1 seek=100 oflag=direct,dsync status=none
grep -q "^fua 409600 4096$" "$log" || fail "O_DSYNC direct write was not FUA: $(cat $log)"

"$VMTEST" destroy 0
wait "$daemon"
