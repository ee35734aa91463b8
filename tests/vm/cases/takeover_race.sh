# Overlapping takeovers: two `handoff`s of one device at once, and, after
# a kill -9, a `handoff` racing an `attach --recover`, seven rounds of each
# (fewer on the debug kernel: lib.bash's repeats), under a verifying fio
# load on the raw device; with the read/write
# channels and with io_uring. Each queue must end with a live channel
# whatever the order in which the racing daemons' channels attach and
# answer FUSE_INIT: fio finishes (bounded) without an error, every request
# is answered (sysfs inflight back to 0), the device detaches, and no
# daemon or device is left. Before fdd65d6 the module took the INIT of a
# channel already retired, and a queue could end up with a retired active
# channel: both racing daemons gave up waiting for the queues, I/O failed.
#
# The backend is a file without passthrough, so that every request goes
# through the racing daemons: a successor cannot serve a mem: device (its
# contents live in the daemon that is replaced), and `handoff` refuses one.
. "$CASES/lib.bash"

rounds=$(repeats 7)
image=/tmp/race.img
name=race

# The pids of the daemons serving device $1, one a line: the one that
# attached it and every `attach --recover` since (the foreground `attach`
# waiting for its daemon carries no --ready-fd).
daemons_of() {
    pgrep -f -- "^$FUSE_BLK attach .*--(name|recover) $1 .*--ready-fd" || true
}
# Runs the commands given as strings at once; fails unless every one
# succeeds within $1 seconds.
together() {
    local limit=$1; shift
    local pids=() cmd i=0 status=0
    for cmd in "$@"; do
        timeout "$limit" bash -c "$cmd" > "/tmp/race-cmd.$i" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            echo "failed or timed out after $limit s: ${*:$((i + 1)):1}"
            cat "/tmp/race-cmd.$i"
            status=1
        fi
    done
    return "$status"
}
# What the module, the daemons and the kernel log say of the device (on a
# failure).
show_device() {
    local sys=/sys/block/${dev#/dev/}/fuse_blk
    echo "state $(cat "$sys/state" 2>/dev/null), inflight $(cat "$sys/inflight" 2>/dev/null)"
    "$FUSE_BLK" list || true
    echo "daemons: $(daemons_of "$name" | tr '\n' ' ')"
    echo "daemon log:"; tail -n 8 "/run/fuse-blk/$name/daemon.log" 2>/dev/null || true
    echo "kernel log:"; dmesg | tail -n +$(( ${dmesg_mark:-0} + 1 )) | tail -n 8
}
# fio verifying the whole device in a loop until /tmp/race.stop, two jobs
# on their own halves so that both CPUs' queues are busy; failures go to
# /tmp/race.failed.
start_race_load() {
    rm -f /tmp/race.stop /tmp/race.failed
    ( n=0
      while [ ! -e /tmp/race.stop ]; do
          n=$((n + 1))
          fio --name=verify --filename="$dev" --ioengine=libaio --direct=1 --iodepth=16 \
              --rw=randwrite --bs=4k --size=32M --numjobs=2 --offset_increment=32M \
              --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
              --verify_state_save=0 --output=/tmp/race-load.out 2> /tmp/race-load.err \
              || { cp /tmp/race-load.out /tmp/race.failed; echo "fio run $n failed" >> /tmp/race.failed; }
      done ) &
    load=$!
    # A failed check ends the case; the load ends with it.
    trap 'touch /tmp/race.stop' EXIT
}
# Stops the load; a fio run that does not end within 120 s (every request
# left is reissued or failed well before: I/O timeout 10 s) is a stall.
stop_race_load() {
    touch /tmp/race.stop
    local deadline=$(( $(date +%s) + 120 ))
    while kill -0 "$load" 2>/dev/null; do
        if [ "$(date +%s)" -gt "$deadline" ]; then
            show_device
            fail "$1: fio stalled (still running 120 s after the last round)"
        fi
        sleep 1
    done
    wait "$load" || true
    if [ -e /tmp/race.failed ]; then
        tail -n 20 /tmp/race.failed; head -n 5 /tmp/race-load.err
        show_device
        fail "$1: fio failed"
    fi
}

for io in $(io_modes); do
    rm -f "$image"; truncate -s 64M "$image"
    started=$(date +%s)
    dev=$(attach --name "$name" --queues 4 --io "$io" --io-timeout-ms 10000 \
        --no-passthrough "file:$image")
    [ "$(listed "$name" io)" = "$io" ] || fail "$io: attached with io $(listed "$name" io)"
    dmesg_mark=$(dmesg | wc -l)
    start_race_load
    for i in $(seq "$rounds"); do
        together 120 "'$FUSE_BLK' handoff $name > /dev/null" \
            "'$FUSE_BLK' handoff $name > /dev/null" ||
            { show_device; fail "$io round $i: two handoffs at once"; }
        sleep 0.2
        for pid in $(daemons_of "$name"); do kill -9 "$pid"; done
        while [ -n "$(daemons_of "$name")" ]; do sleep 0.05; done
        together 120 "'$FUSE_BLK' handoff $name > /dev/null" \
            "'$FUSE_BLK' attach --transport kmod --recover $name --io $io 'file:$image' > /dev/null" ||
            { show_device; fail "$io round $i: handoff against attach --recover"; }
        [ "$(listed "$name" io)" = "$io" ] || fail "$io round $i: now io $(listed "$name" io)"
        kill -0 "$load" 2>/dev/null || fail "$io round $i: the load ended"
        echo "$io round $i: daemons $(daemons_of "$name" | tr '\n' ' ')"
        sleep 0.2
    done
    # Long enough for a request stuck on a queue to time out twice.
    sleep 20
    stop_race_load "$io"
    sys=/sys/block/${dev#/dev/}/fuse_blk
    for _ in $(seq 100); do
        [ "$(cat "$sys/inflight")" = 0 ] && break
        sleep 0.1
    done
    [ "$(cat "$sys/inflight")" = 0 ] || { show_device; fail "$io: requests still in flight"; }
    [ "$(cat "$sys/state")" = live ] || { show_device; fail "$io: device not live"; }
    no_io_errors
    timeout 60 "$FUSE_BLK" detach "$name" || { show_device; fail "$io: detach"; }
    [ ! -e "$dev" ] || fail "$io: $dev left after detach"
    for _ in $(seq 100); do
        [ -z "$(daemons_of "$name")" ] && break
        sleep 0.1
    done
    [ -z "$(daemons_of "$name")" ] || fail "$io: daemons left: $(daemons_of "$name" | tr '\n' ' ')"
    ! "$FUSE_BLK" list | grep -q "^$name " || fail "$io: still listed"
    echo "$io: $rounds rounds of each race, fio clean, nothing left ($(( $(date +%s) - started )) s)"
done
rm -f "$image"
