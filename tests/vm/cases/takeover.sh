# Racing takeovers, RWF_NOWAIT reads and a stale reply after an elevator
# switch, driven message by message on raw channels (see
# tests/src/bin/fuse-blk-vmtest/takeover.rs).
. "$CASES/lib.bash"
"$VMTEST" takeover | tee /tmp/takeover.out
grep -q "the later attach keeps the queue" /tmp/takeover.out || fail "takeover race"
grep -q "the winner serves the next request" /tmp/takeover.out || fail "winner serves"
grep -q "refused as expected: RWF_NOWAIT" /tmp/takeover.out || fail "RWF_NOWAIT"
