# A daemon with a file: backend, served over io_uring, stays under 8 MiB of
# resident memory when idle, also after large I/O has touched its ring
# buffers (they are given back after a second without requests).
. "$CASES/lib.bash"
mount -t tmpfs -o size=300M tmpfs /mnt
truncate -s 256M /mnt/idle.img
# Without passthrough: the I/O has to go through the daemon's buffers.
dev=$(attach --name idle --io uring --queues 2 --no-passthrough file:/mnt/idle.img)
rss() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$(daemon_pid idle)/status"; }
sleep 2
before=$(rss)
fio --name=big --filename="$dev" --ioengine=libaio --direct=1 --rw=write --bs=1M \
    --iodepth=16 --size=128M --output=/tmp/fio.out || { cat /tmp/fio.out; fail "fio write"; }
fio --name=big --filename="$dev" --ioengine=libaio --direct=1 --rw=read --bs=1M \
    --iodepth=16 --size=128M --output=/tmp/fio.out || { cat /tmp/fio.out; fail "fio read"; }
busy=$(rss)
sleep 3
idle=$(rss)
echo "RSS: ${before} kB idle at start, ${busy} kB after 1 MiB I/O at depth 16, ${idle} kB idle again"
[ "$before" -lt 8192 ] || fail "idle at start: $before kB"
[ "$idle" -lt 8192 ] || fail "idle after I/O: $idle kB"
# The check means something only if the I/O did fill the ring buffers.
[ "$busy" -ge 12288 ] || fail "1 MiB I/O left only $busy kB resident: buffers not in use?"
detach idle
umount /mnt
