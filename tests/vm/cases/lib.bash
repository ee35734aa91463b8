# Shared helpers of the VM cases (sourced).
fail() { echo "FAIL: $*" >&2; exit 1; }
attach() { "$FUSE_BLK" attach --transport kmod "$@"; }
detach() { "$FUSE_BLK" detach "$@"; }
# Random data file of $2 MiB with seed-independent content.
random_file() { head -c "$(( $2 << 20 ))" /dev/urandom > "$1"; }
sum() { sha256sum "$1" | cut -d' ' -f1; }
# Field $2 of device $1 as `list --json` gives it (strings unquoted).
listed() {
    "$FUSE_BLK" list --json | tr -d '\n ' | sed 's/},{/}\n{/g' | grep "\"name\":\"$1\"" \
        | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p"
}
daemon_pid() { listed "$1" pid; }
# kB of field $2 of device $1's daemon's /proc status (VmRSS: resident;
# RssAnon: its anonymous part, where buffers are).
daemon_kb() { sed -n "s/^$2:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$(daemon_pid "$1")/status"; }
# Whether the loaded module offers feature $1 (FUSE_BLK_F_<NAME> in lower
# case: uring, passthrough...).
module_offers() { "$VMTEST" features | tr ' ' '\n' | grep -qx "$1"; }
# What a case leaves untested because this kernel lacks it, on a line the
# guest shows even for a passing case; skip_rest also ends the case (the
# guest reports it skipped, not passed).
skip_part() { echo "SKIP: $* ($(uname -r))" >&2; }
skip_rest() { skip_part "$@"; exit 77; }
# The channel kinds a case runs over: io_uring where the module offers it,
# and read/write.
io_modes() {
    if module_offers uring; then echo uring rw; else skip_part "io_uring channels: the module does not offer them"; echo rw; fi
}
# A verifying fio load in a loop on directory $1 until stop_load; any fio
# failure is recorded in /tmp/load.failed.
start_load() {
    rm -f /tmp/load.stop /tmp/load.failed
    ( n=0
      while [ ! -e /tmp/load.stop ]; do
          n=$((n + 1))
          fio --name=verify --directory="$1" --ioengine=libaio --direct=1 --iodepth=16 \
              --rw=randwrite --bs=4k --size=32M --verify=crc32c --verify_fatal=1 \
              --do_verify=1 --randrepeat=0 --verify_state_save=0 --output=/tmp/load.out \
              || { cp /tmp/load.out /tmp/load.failed; echo "fio run $n failed" >> /tmp/load.failed; }
      done ) &
    load=$!
}
stop_load() {
    touch /tmp/load.stop
    wait "$load"
    if [ -e /tmp/load.failed ]; then cat /tmp/load.failed; fail "fio failed under the load"; fi
}
# What the kernel logged before this case began is other cases' (a case
# such as destroy_busy leaves I/O errors behind on purpose): no_io_errors
# looks from here on, or from where a case moves the mark.
dmesg_mark=$(dmesg | wc -l)
no_io_errors() {
    if dmesg | tail -n +$(( ${dmesg_mark:-0} + 1 )) | grep -Ei 'I/O error|timed out|EXT4-fs error|Buffer I/O'; then
        fail "I/O errors in the kernel log"
    fi
}
# Attaches a fresh 384 MiB image file $2 as device $1 (4 KiB blocks, two
# queues, further attach arguments after), makes ext4 on it and mounts it
# on /tmp/mnt; sets $dev.
mount_image_device() {
    local name=$1 image=$2
    shift 2
    rm -f "$image"; truncate -s 384M "$image"
    dev=$(attach --name "$name" --queues 2 --block-size 4096 "$@" "file:$image")
    mkfs.ext4 -q "$dev"
    mkdir -p /tmp/mnt
    mount "$dev" /tmp/mnt
    # Kernel messages from here on are this case's.
    dmesg_mark=$(dmesg | wc -l)
}
# ext4 on $1: write $2 MiB of random data, check it through a fresh
# mount, fsck clean.
ext4_roundtrip() {
    mkfs.ext4 -q "$1"
    mkdir -p /tmp/mnt
    mount "$1" /tmp/mnt
    random_file /tmp/mnt/data "$2"
    local want; want=$(sum /tmp/mnt/data)
    umount /tmp/mnt
    mount "$1" /tmp/mnt
    [ "$(sum /tmp/mnt/data)" = "$want" ] || fail "checksum on $1"
    umount /tmp/mnt
    e2fsck -fn "$1" || fail "fsck of $1"
}
# The descriptors of process $1 that are io_uring instances, one a line.
ring_fds() {
    local fd
    for fd in /proc/"$1"/fd/*; do
        [ "$(readlink "$fd")" = "anon_inode:[io_uring]" ] && echo "${fd##*/}"
    done
}
# Completions the io_uring instances of process $1 have reaped (fdinfo
# CqHead).
ring_completions() {
    local pid=$1 total=0 fd head
    for fd in $(ring_fds "$pid"); do
        head=$(sed -n 's/^CqHead:[[:space:]]*//p' "/proc/$pid/fdinfo/$fd")
        total=$((total + head))
    done
    echo "$total"
}
# How many times a case repeats what it tests: $1 on a kernel of normal
# speed, $1 / VM_SLOW (at least once) on a debug kernel that runs VM_SLOW
# times slower (tests/vm/run --kernel debug). Its sanitizers report a bug
# the first time a path runs; the races that want many rounds get them on
# the other kernels.
repeats() {
    local n=$(( $1 / ${VM_SLOW:-1} ))
    echo $(( n > 0 ? n : 1 ))
}
# How many MiB a case's data-path load moves: $1, divided the same way as
# repeats on the debug kernel (its sanitizers see each path on the first
# MiB; the volume is for the other kernels).
scaled_mib() { repeats "$1"; }
# Ends the systemd-udevd a case started, and waits until it has gone:
# `udevadm control --exit` returns at once, and a udevd still probing
# would read the next case's new devices (takeover's check that nothing is
# queued saw such a read).
# It has been seen to stay after --exit (after the systemd case): then it
# is killed.
stop_udevd() {
    udevadm control --exit || true
    local end=$((SECONDS + 5 * ${VM_SLOW:-1}))
    while pgrep -x systemd-udevd > /dev/null && [ $SECONDS -lt "$end" ]; do sleep 0.1; done
    if pgrep -x systemd-udevd > /dev/null; then
        echo "systemd-udevd still runs after --exit: killed" >&2
        pkill -9 -x systemd-udevd || true
        while pgrep -x systemd-udevd > /dev/null; do sleep 0.1; done
    fi
}
