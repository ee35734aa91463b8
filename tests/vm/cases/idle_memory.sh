# A daemon with a file: backend stays under 8 MiB of resident memory when
# idle, also after large I/O has filled its buffers: io_uring entries'
# payload buffers, or each read/write-channel thread's receive and reply
# buffers. They are given back after a second without requests.
. "$CASES/lib.bash"
mount -t tmpfs -o size=300M tmpfs /mnt
# Also after a failure: nothing of the case is left.
trap 'touch /tmp/idle.stop; "$FUSE_BLK" detach idle 2>/dev/null || true; umount /mnt 2>/dev/null || true' EXIT
truncate -s 256M /mnt/idle.img
for io in $(io_modes); do
    # Without passthrough: the I/O has to go through the daemon's buffers.
    dev=$(attach --name idle --io "$io" --queues 2 --no-passthrough file:/mnt/idle.img)
    sleep 2
    before=$(daemon_kb idle VmRSS)
    before_anon=$(daemon_kb idle RssAnon)
    # The most anonymous memory while fio runs, sampled every 0.1 s: what
    # shows the I/O used the buffers. Not VmHWM: the page cache of fio's
    # I/O may push the daemon's file pages (its binary) out meanwhile on
    # the debug kernel's guest, hiding the buffers in the total; nor a
    # sample after fio, whose slow exit there lets them be given back.
    rm -f /tmp/idle.stop
    ( peak=0
      while [ ! -e /tmp/idle.stop ]; do
          now=$(daemon_kb idle RssAnon); [ "${now:-0}" -le "$peak" ] || peak=$now
          echo "$peak" > /tmp/idle.peak; sleep 0.1
      done ) &
    sampler=$!
    for rw in write read; do
        fio --name=big --filename="$dev" --ioengine=libaio --direct=1 --rw=$rw --bs=1M \
            --iodepth=16 --size=128M --output=/tmp/fio.out || { cat /tmp/fio.out; fail "$io: fio $rw"; }
    done
    touch /tmp/idle.stop
    wait "$sampler"
    busy_anon=$(cat /tmp/idle.peak)
    sleep 3
    idle=$(daemon_kb idle VmRSS)
    echo "$io: RSS ${before} kB idle at start (${before_anon} kB anonymous), ${busy_anon} kB anonymous at most during 1 MiB I/O at depth 16, ${idle} kB idle again"
    [ "$before" -lt 8192 ] || fail "$io: idle at start: $before kB"
    [ "$idle" -lt 8192 ] || fail "$io: idle after I/O: $idle kB"
    [ "$idle" -lt $((before + 512)) ] || fail "$io: idle after I/O: $idle kB, $before kB before"
    # The checks mean something only if the I/O did fill buffers: one
    # thread's 1 MiB at least (fio may have used one queue only).
    [ "$busy_anon" -ge $((before_anon + 1024)) ] || fail "$io: 1 MiB I/O added only $((busy_anon - before_anon)) kB: buffers not in use?"
    detach idle
done
umount /mnt
