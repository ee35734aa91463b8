# When no daemon comes back within the recovery timeout, I/O fails with
# EIO (no hang) and the device can be destroyed; with a timeout of 0 it
# fails at once.
. "$CASES/lib.bash"
for timeout in 2000 0; do
    dev=$(attach --name exp --recovery-timeout-ms "$timeout" mem:16M)
    kill -9 "$(daemon_pid exp)"
    sleep 0.5
    start=$(date +%s)
    if dd if="$dev" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null; then
        fail "read without a daemon succeeded (timeout $timeout)"
    fi
    elapsed=$(( $(date +%s) - start ))
    [ "$elapsed" -lt 15 ] || fail "EIO took $elapsed s (timeout $timeout)"
    detach exp
    [ ! -e "$dev" ] || fail "device left"
done
