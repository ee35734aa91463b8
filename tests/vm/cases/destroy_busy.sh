# Destroy while mounted with I/O in flight completes without a hang; the
# daemon sees FUSE_DESTROY and exits.
. "$CASES/lib.bash"
dev=$(attach --name busy mem:256M)
mkfs.ext4 -q "$dev"
mkdir -p /tmp/mnt
mount "$dev" /tmp/mnt
fio --name=load --directory=/tmp/mnt --ioengine=libaio --direct=1 --iodepth=16 \
    --rw=randwrite --bs=4k --size=32M --time_based --runtime=60 --output=/tmp/fio.out &
fio=$!
sleep 3
pid=$(daemon_pid busy)
timeout 60 "$VMTEST" destroy 0 || fail "destroy failed or hung"
[ ! -e "$dev" ] || fail "device still there"
timeout 60 tail --pid="$pid" -f /dev/null || fail "daemon did not exit"
wait "$fio" || true
umount /tmp/mnt || umount -l /tmp/mnt
"$FUSE_BLK" list | grep -q busy && fail "state left behind"
true
