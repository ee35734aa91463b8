# In-flight requests of a dead daemon are reissued to the next daemon; with
# --fail-inflight exactly they fail, while requests queued after the death
# wait for the next daemon.
. "$CASES/lib.bash"
held=$((1 << 20))
run_hold() {   # [fail-inflight]
    "$VMTEST" hold 16M "$@" > /tmp/hold.out &
    hold=$!
    for _ in $(seq 100); do [ -s /tmp/hold.out ] && break; sleep 0.1; done
    dev=$(cat /tmp/hold.out)
    [ -b "$dev" ] || fail "no device"
}
read_at() { dd if="$dev" of=/dev/null bs=4096 count=1 skip=$(( $1 / 4096 )) iflag=direct status=none; }

# Reissue (the default).
run_hold
read_at "$held" & reader=$!
sleep 1
kill -0 "$reader" 2>/dev/null || fail "the held read finished"
kill -9 "$hold"; wait "$hold" || true
"$VMTEST" resume 0 16M > /tmp/resume.out & resumed=$!
wait "$reader" || fail "the reissued read failed"
"$VMTEST" destroy 0; wait "$resumed"

# Fail in-flight.
run_hold fail-inflight
read_at "$held" & reader=$!
sleep 1
read_at 8192 || fail "an ordinary read failed"
kill -9 "$hold"; wait "$hold" || true
if wait "$reader"; then fail "the in-flight read was not failed"; fi
read_at 16384 & later=$!
sleep 1
kill -0 "$later" 2>/dev/null || fail "a read issued after the death did not wait"
"$VMTEST" resume 0 16M > /tmp/resume.out & resumed=$!
wait "$later" || fail "the waiting read failed after recovery"
"$VMTEST" destroy 0; wait "$resumed"
