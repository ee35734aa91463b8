# The daemon killed with kill -9 during fio: I/O errors out after the
# timeout, nothing hangs, and detach removes the device.
. "$CASES/lib.bash"
dev=$(attach --name victim --io-timeout-ms 2000 --recovery-timeout-ms 2000 mem:64M)
pid=$(daemon_pid victim)
fio --name=load --filename="$dev" --ioengine=libaio --direct=1 --iodepth=32 \
    --rw=randwrite --bs=4k --time_based --runtime=60 --output=/tmp/fio.out &
fio=$!
sleep 3
kill -9 "$pid"
start=$(date +%s)
if wait "$fio"; then fail "fio did not see errors"; fi
elapsed=$(( $(date +%s) - start ))
[ "$elapsed" -lt 30 ] || fail "fio took $elapsed s to fail"
"$FUSE_BLK" list | grep -q "victim.*orphaned" || fail "list does not show the dead daemon"
detach victim
[ ! -e "$dev" ] || fail "device left"
