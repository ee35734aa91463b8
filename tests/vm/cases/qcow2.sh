# qcow2 images through the module (attach qcow2:PATH).
# 1. 20 times (fewer on the debug kernel: lib.bash's repeats) kill -9 of
#    the daemon in the middle of a fio write load with fsyncs and discards:
#    `qemu-img check` finds leaks at most (exit 0 or 3, never 2: corruption),
#    and what a flush covered before the kill is there after attaching the
#    image again: a pattern written with fsync before the load and one
#    written with fsync while the load runs.
# 2. handoff of a qcow2 device under a verifying fio load on mounted ext4
#    (the successor waits for the old daemon's image lock): zero I/O
#    errors, fsck clean, the image clean.
# 3. kill -9 of the daemon and attach --recover under that load: the
#    same.
. "$CASES/lib.bash"
command -v qemu-img > /dev/null || fail "qemu-img is missing (qemu-utils)"

# qemu-img check: 0 clean, 3 leaks only; 2 corruption, 1 not checked.
check_image() {
    local status=0
    qemu-img check "$1" > /tmp/check.out 2>&1 || status=$?
    case $status in
    0|3) ;;
    *) cat /tmp/check.out; fail "$2: qemu-img check exited $status" ;;
    esac
    leaks=$(sed -n 's/^\([0-9]*\) leaked clusters.*/\1/p' /tmp/check.out)
}

# The first $2 MiB at $3 MiB of device $1, read past the page cache.
region_sum() {
    dd if="$1" bs=1M skip="$3" count="$2" iflag=direct status=none | sha256sum | cut -d' ' -f1
}
# Writes file $2 at $3 MiB of device $1 and fsyncs it.
write_synced() {
    dd if="$2" of="$1" bs=1M seek="$3" oflag=direct conv=fsync,notrunc status=none
}

image=/tmp/kill.qcow2
rm -f "$image"
qemu-img create -q -f qcow2 "$image" 256M
dev=$(attach --name qk --queues 2 "qcow2:$image")
rounds=$(repeats 20)
for i in $(seq "$rounds"); do
    # Flushed before the load: 8 MiB at 0; while it runs: 8 MiB at 8 MiB.
    random_file /tmp/before 8
    random_file /tmp/during 8
    write_synced "$dev" /tmp/before 0
    fio --name=load --filename="$dev" --ioengine=libaio --direct=1 --iodepth=16 \
        --rw=randwrite --bsrange=4k-128k --offset=16M --size=240M --fsync=8 \
        --time_based --runtime=120 --randrepeat=0 \
        --name=trim --filename="$dev" --ioengine=psync --rw=randtrim --bs=64k \
        --offset=16M --size=240M --time_based --runtime=120 --randrepeat=0 \
        --output=/tmp/fio.out > /dev/null 2>&1 &
    load=$!
    sleep 1
    write_synced "$dev" /tmp/during 8
    # Somewhere in the load (0 to 1 s more).
    sleep "0.$((RANDOM % 10))"
    kill -0 "$load" 2>/dev/null || { cat /tmp/fio.out; fail "round $i: fio ended before the kill"; }
    pid=$(daemon_pid qk)
    kill -9 "$pid"
    while [ -e "/proc/$pid" ]; do sleep 0.05; done
    # Removing the orphaned device fails the load's waiting requests.
    detach qk 2> /dev/null
    wait "$load" || true
    check_image "$image" "round $i"
    dev=$(attach --name qk --queues 2 "qcow2:$image") || fail "round $i: attaching again"
    [ "$(region_sum "$dev" 8 0)" = "$(sum /tmp/before)" ] || fail "round $i: data flushed before the load is lost"
    [ "$(region_sum "$dev" 8 8)" = "$(sum /tmp/during)" ] || fail "round $i: data flushed during the load is lost"
    echo "round $i: clean, ${leaks:-0} leaked clusters"
done
detach qk
check_image "$image" "after $rounds rounds"
# The kills' I/O errors (the removed device's) are expected; from here on
# none is.
dmesg_mark=$(dmesg | wc -l)

# Handoff and recovery under a verifying load on ext4.
image=/tmp/served.qcow2
rm -f "$image"
qemu-img create -q -f qcow2 "$image" 384M
dev=$(attach --name qh --queues 2 --block-size 4096 "qcow2:$image")
mkfs.ext4 -q "$dev"
mkdir -p /tmp/mnt
mount "$dev" /tmp/mnt
start_load /tmp/mnt
# `fuse-blk handoff`: the successor's requests wait for the old daemon's
# image lock.
handoffs=$(repeats 10)
for i in $(seq "$handoffs"); do
    old=$(daemon_pid qh)
    "$FUSE_BLK" handoff qh > /tmp/handoff.out 2>&1 || { cat /tmp/handoff.out; fail "handoff $i"; }
    [ "$(daemon_pid qh)" != "$old" ] || fail "handoff $i: still pid $old"
    sleep 0.3
done
echo "$handoffs handoffs"
recoveries=$(repeats 10)
for i in $(seq "$recoveries"); do
    pid=$(daemon_pid qh)
    kill -9 "$pid"
    while [ -e "/proc/$pid" ]; do sleep 0.05; done
    sleep 0.5
    "$FUSE_BLK" list | grep -q "^qh .*orphaned" || fail "recovery $i: not orphaned"
    attach --recover qh "qcow2:$image" > /dev/null || fail "recovery $i: attach --recover"
    sleep 0.3
done
echo "$recoveries recoveries"
stop_load
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck"
no_io_errors
detach qh
check_image "$image" "after the handoffs and recoveries"
echo "served image: ${leaks:-0} leaked clusters"
