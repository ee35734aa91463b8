# Helpers of the soak (sourced by tests/soak and the guest-side scripts).
fail() { echo "soak: FAIL: $*" >&2; exit 1; }
# For a part's subshell: any command that fails (errexit) says where.
trap_errors() {
    set -E
    trap 'echo "soak: FAIL: line $LINENO of ${BASH_SOURCE[0]}: $BASH_COMMAND (status $?)" >&2' ERR
}
now() { date +%s; }
# Whether process $1 runs (a zombie does not: the host's init may be slow
# to reap the daemons it inherits).
alive() { [ -e "/proc/$1" ] && ! awk '{ exit $3 != "Z" }' "/proc/$1/stat" 2>/dev/null; }
# Field $2 of device $1 as `fuse-blk list --json` gives it (strings
# unquoted), with the runtime directory the caller exported; empty if the
# device is not listed.
listed() {
    { "$FUSE_BLK" list --json || true; } | tr -d '\n ' | sed 's/},{/}\n{/g' \
        | { grep "\"name\":\"$1\"" || true; } | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p"
}
# The pid of device $1's daemon once it is not $2 (after a handoff or a
# recovery the successor records itself), and how many listings that took
# (1: listed at once): within 10 s (times VM_SLOW on the debug kernel),
# else empty.
successor() {
    local name=$1 old=$2 pid i
    for i in $(seq $((100 * ${VM_SLOW:-1}))); do
        pid=$(listed "$name" pid)
        if [ -n "$pid" ] && [ "$pid" != "$old" ]; then echo "$pid $i"; return; fi
        sleep 0.1
    done
}
# A verifying fio load looping in directory $1 until stop_load, in the
# background; $2: a directory for its records. Each run's failure is kept
# in $2/failed.N.
start_load() {
    local dir=$1 rec=$2
    rm -f "$rec"/stop "$rec"/failed.* "$rec"/runs
    ( n=0
      while [ ! -e "$rec/stop" ]; do
          n=$((n + 1))
          rm -f "$rec/fio.out"
          fio --name=verify --directory="$dir" --ioengine=libaio --direct=1 --iodepth=16 \
              --rw=randwrite --bs=4k --size=32M --verify=crc32c --verify_fatal=1 \
              --do_verify=1 --randrepeat=0 --verify_state_save=0 \
              --output="$rec/fio.out" > "$rec/fio.err" 2>&1 && rc=0 || rc=$?
          if [ "$rc" != 0 ]; then
              { echo "fio exited with $rc"; cat "$rec/fio.out" "$rec/fio.err" 2>/dev/null || true; } \
                  > "$rec/failed.$n"
          fi
          echo "$n" > "$rec/runs"
      done ) &
    load_pid=$!
}
# Stops the load; sets fio_runs and fio_failed, prints what failed.
stop_load() {
    local rec=$1 f
    touch "$rec/stop"
    wait "$load_pid" || echo "the load loop failed" > "$rec/failed.loop"
    load_pid=
    fio_runs=$(cat "$rec/runs" 2>/dev/null || echo 0)
    fio_failed=0
    for f in "$rec"/failed.*; do
        [ -e "$f" ] || continue
        fio_failed=$((fio_failed + 1))
        echo "soak: fio run ${f##*.} failed:" >&2
        tail -n 20 "$f" | sed 's/^/    /' >&2
    done
}
