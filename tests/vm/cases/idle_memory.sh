# A daemon with a file: backend stays under 8 MiB of resident memory when
# idle, also after large I/O has filled its buffers: io_uring entries'
# payload buffers, or each read/write-channel thread's receive and reply
# buffers. They are given back after a second without requests.
. "$CASES/lib.bash"
mount -t tmpfs -o size=300M tmpfs /mnt
truncate -s 256M /mnt/idle.img
# kB resident now (VmRSS), or at most since clear_refs (VmHWM). The peak
# is what shows the I/O used the buffers: they may be given back before
# a sample taken after fio (whose exit is slow on a debug kernel) sees them.
rss() { sed -n "s/^${1:-VmRSS}:[[:space:]]*\([0-9]*\) kB/\1/p" "/proc/$(daemon_pid idle)/status"; }
for io in $(io_modes); do
    # Without passthrough: the I/O has to go through the daemon's buffers.
    dev=$(attach --name idle --io "$io" --queues 2 --no-passthrough file:/mnt/idle.img)
    sleep 2
    before=$(rss)
    # The peak from here on only (not the start's).
    echo 5 > "/proc/$(daemon_pid idle)/clear_refs"
    for rw in write read; do
        fio --name=big --filename="$dev" --ioengine=libaio --direct=1 --rw=$rw --bs=1M \
            --iodepth=16 --size=128M --output=/tmp/fio.out || { cat /tmp/fio.out; fail "$io: fio $rw"; }
    done
    busy=$(rss VmHWM)
    sleep 3
    idle=$(rss)
    echo "$io: RSS ${before} kB idle at start, ${busy} kB at most during 1 MiB I/O at depth 16, ${idle} kB idle again"
    [ "$before" -lt 8192 ] || fail "$io: idle at start: $before kB"
    [ "$idle" -lt 8192 ] || fail "$io: idle after I/O: $idle kB"
    [ "$idle" -lt $((before + 512)) ] || fail "$io: idle after I/O: $idle kB, $before kB before"
    # The checks mean something only if the I/O did fill buffers: one
    # thread's 1 MiB at least (fio may have used one queue only).
    [ "$busy" -ge $((before + 1024)) ] || fail "$io: 1 MiB I/O added only $((busy - before)) kB: buffers not in use?"
    detach idle
done
umount /mnt
