# 20 cycles (fewer on the debug kernel: lib.bash's repeats) of kill -9 of
# the daemon and a restart within a second, under a verifying fio load on
# mounted ext4: zero I/O errors, fsck clean. Every request goes through
# the daemons (passthrough.sh kills a passthrough one).
. "$CASES/lib.bash"
image=/tmp/recover.img
mount_image_device rc "$image" --no-passthrough
start_load /tmp/mnt
for i in $(seq "$(repeats 20)"); do
    pid=$(daemon_pid rc)
    kill -9 "$pid"
    while [ -e "/proc/$pid" ]; do sleep 0.05; done
    sleep 0.5
    "$FUSE_BLK" list | grep -q "^rc .*orphaned" || fail "cycle $i: not orphaned"
    attach --recover rc "file:$image" > /dev/null || fail "recover $i"
    sleep 0.3
done
stop_load
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck"
no_io_errors
detach rc
