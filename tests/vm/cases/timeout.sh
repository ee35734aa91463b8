# A daemon that stops answering: the request is interrupted, then fails
# with EIO; once the daemon runs again the device works.
. "$CASES/lib.bash"
dev=$(attach --name slow --io-timeout-ms 1000 mem:16M)
pid=$(daemon_pid slow)
kill -STOP "$pid"
start=$(date +%s)
if dd if="$dev" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
    kill -CONT "$pid"; fail "read of a stopped daemon succeeded"
fi
elapsed=$(( $(date +%s) - start ))
kill -CONT "$pid"
[ "$elapsed" -lt 20 ] || fail "took $elapsed s"
dd if=/dev/urandom of=/tmp/blk bs=4096 count=1 status=none
dd if=/tmp/blk of="$dev" bs=4096 count=1 oflag=direct status=none || fail "write after resume"
cmp <(head -c 4096 "$dev") /tmp/blk || fail "read after resume"
detach slow
