# The module when its memory allocations fail: failslab and fail_page_alloc
# (the debug kernel's fault injection) aimed at the module by their
# stack-trace filter, so that only allocations made from fuse_blk.ko's
# own code, or from kernel code it called, fail. Attaching either works
# or fails with an error and leaves nothing behind; I/O on every channel
# kind ends (done or failed) and the device is usable and removable once
# the failures stop. The guest's kernel-log and kmemleak checks find any
# report, use-after-free or leak on the error paths this drives.
. "$CASES/lib.bash"
debugfs=/sys/kernel/debug
[ -d "$debugfs/failslab" ] || mount -t debugfs none "$debugfs" 2>/dev/null || true
for attr in failslab fail_page_alloc; do
    [ -e "$debugfs/$attr/require-start" ] ||
        skip_rest "no $attr with a stack-trace filter (CONFIG_FAULT_INJECTION_DEBUG_FS, CONFIG_FAULT_INJECTION_STACKTRACE_FILTER): the debug kernel has it (tests/vm/run --kernel debug faults)"
done

# The module's code: from its lowest to past its highest function address
# (kallsyms' addresses are 16 hex digits, so they sort as text).
addresses=$(awk '$4 == "[fuse_blk]" && ($2 == "t" || $2 == "T") { print $1 }' /proc/kallsyms | sort)
low=$(head -n 1 <<< "$addresses") high=$(tail -n 1 <<< "$addresses")
[ -n "$low" ] && [ "$low" != 0000000000000000 ] || fail "no fuse_blk addresses in /proc/kallsyms"
require_start=0x$low
require_end=$(printf '0x%x' $((0x$high + 0x1000)))
echo "failures aimed at fuse_blk.ko's code, $require_start..$require_end"

# arm ATTR PERCENT TIMES SPACE: allocations on the module's path fail
# with that probability, at most TIMES of them (-1: no limit), once SPACE
# has been allocated on it (what the injector counts down: bytes for
# failslab, pages for fail_page_alloc).
arm() {
    local d=$debugfs/$1
    echo "$require_start" > "$d/require-start"
    echo "$require_end" > "$d/require-end"
    echo 32 > "$d/stacktrace-depth"
    echo N > "$d/ignore-gfp-wait"
    echo 1 > "$d/interval"
    echo 0 > "$d/verbose"
    echo "$4" > "$d/space"
    echo "$3" > "$d/times"
    echo "$2" > "$d/probability"
}
disarm() { echo 0 > "$debugfs/$1/probability"; }
# Both injectors at PERCENT with a budget of failures; disarm_all prints
# how many of the budget they used.
budget=100000
arm_all() { local attr; for attr in failslab fail_page_alloc; do arm "$attr" "$1" "$budget" 0; done; }
disarm_all() {
    local attr used=0
    for attr in failslab fail_page_alloc; do
        disarm "$attr"
        used=$((used + budget - $(cat "$debugfs/$attr/times")))
    done
    echo "$used"
}
[ -e "$debugfs/fail_page_alloc/min-order" ] && echo 0 > "$debugfs/fail_page_alloc/min-order"
trap 'for a in failslab fail_page_alloc; do echo 0 > "$debugfs/$a/probability"; done' EXIT

devices() { ls /sys/block | grep -c '^fuseblk' || true; }
# Nothing of device $1 is left: no state, no daemon, no block device beyond
# the $2 there were before.
nothing_left() {
    "$FUSE_BLK" list | grep -qw "$1" && fail "$1: still listed"
    [ "$(devices)" = "$2" ] || { ls /sys/block; fail "$1: a block device is left"; }
    pgrep -f "name $1 " >/dev/null && fail "$1: a daemon is left"
    true
}
# One MiB written and read back through device $1.
roundtrip() {
    head -c 1M /dev/urandom > /tmp/faults.in
    dd if=/tmp/faults.in of="$1" bs=64k oflag=direct status=none || fail "write to $1 after the failures"
    dd if="$1" of=/tmp/faults.out bs=64k count=16 iflag=direct status=none || fail "read of $1 after the failures"
    cmp /tmp/faults.in /tmp/faults.out || fail "$1 read back other data"
}

before=$(devices)
limit=$((60 * ${VM_SLOW:-1}))

# Attach with one allocation failing, walked through every part of the
# attach: for each injector, first the bytes the module's path allocates
# during a whole attach are counted (nothing fails), then attach is run
# again with the one failure placed at steps through that count (steps of
# bytes: most land in the few large allocations, the tag set's). Each
# either comes up and works, or fails with a message and leaves nothing.
attached=0 refused=0
steps=8 unlimited=2147483647  # space is an atomic_t
for attr in failslab fail_page_alloc; do
    # What the injector counts down: bytes of slab objects, pages.
    unit=bytes; [ "$attr" = failslab ] || unit=pages
    arm "$attr" 100 1 "$unlimited"
    dev=$(attach --name measure --queues 2 mem:16M)
    total=$((unlimited - $(cat "$debugfs/$attr/space")))
    disarm "$attr"
    detach measure
    nothing_left measure "$before"
    echo "$attr: attaching allocates $total $unit on the module's path"
    [ "$total" -gt 0 ] || fail "$attr: nothing allocated on the module's path: the filter missed it"
    for k in $(seq 0 $((steps - 1))); do
        name=f-$attr-$k
        arm "$attr" 100 1 $((total * k / steps))
        set +e
        dev=$(timeout "$limit" "$FUSE_BLK" attach --transport kmod --name "$name" --queues 2 mem:16M 2> /tmp/faults.err)
        status=$?
        set -e
        injected=$((1 - $(cat "$debugfs/$attr/times")))
        disarm "$attr"
        [ "$status" != 124 ] || fail "attach $name hung with one allocation failing"
        if [ "$status" = 0 ]; then
            attached=$((attached + 1))
            echo "attach $name: attached ($injected failed allocation)"
            roundtrip "$dev"
            timeout "$limit" "$FUSE_BLK" detach "$name" || fail "detach $name"
        else
            refused=$((refused + 1))
            [ "$injected" = 1 ] || fail "attach $name failed with no allocation failing: $(cat /tmp/faults.err)"
            [ "$(wc -l < /tmp/faults.err)" = 1 ] || { cat /tmp/faults.err; fail "attach $name: not a one-line error"; }
            echo "attach $name: $(cat /tmp/faults.err)"
            # A daemon that failed after the device existed removes it.
            for _ in $(seq 100); do [ "$(devices)" = "$before" ] && break; sleep 0.1; done
        fi
        nothing_left "$name" "$before"
    done
done
echo "attach with one allocation failing: $attached attached, $refused refused"
[ "$refused" -gt 0 ] || fail "no attach failed: the failures missed the module"

# I/O while the module's allocations fail, per channel kind: requests end
# (fio may see errors), nothing hangs, and the device serves again after.
for io in $(io_modes); do
    dev=$(attach --name "fio-$io" --io "$io" --queues 2 mem:64M)
    arm_all 20
    set +e
    timeout "$limit" fio --name=load --filename="$dev" --ioengine=libaio --direct=1 --iodepth=16 \
        --rw=randrw --bsrange=4k-256k --size=32M --runtime=10 --time_based --output=/tmp/fio.out
    status=$?
    set -e
    injected=$(disarm_all)
    [ "$status" != 124 ] || fail "$io: I/O hung with the module's allocations failing"
    echo "$io: fio exit $status, $injected allocations failed"
    roundtrip "$dev"
    timeout "$limit" "$FUSE_BLK" detach "fio-$io" || fail "detach fio-$io"
    nothing_left "fio-$io" "$before"
done

# A daemon killed while allocations fail: its device waits for recovery,
# then is removed; nothing is left.
dev=$(attach --name victim --recovery-timeout-ms 2000 --io-timeout-ms 2000 mem:16M)
pid=$(daemon_pid victim)
fio --name=load --filename="$dev" --ioengine=libaio --direct=1 --iodepth=16 \
    --rw=randwrite --bs=4k --time_based --runtime=20 --output=/tmp/fio.out &
fio=$!
sleep 2
arm_all 30
kill -9 "$pid"
wait "$fio" || true
echo "killed daemon: $(disarm_all) allocations failed"
timeout "$limit" "$FUSE_BLK" detach victim || fail "detach victim"
nothing_left victim "$before"
