# The module's passthrough (a file: backend, by default): the driver reads
# and writes the image itself, so reads and writes go on while the daemon
# is stopped or dead; flushes still wait for a daemon. Data lands in the
# image, verified both ways; handoffs under load and a kill -9 with
# --recover keep ext4 clean; files the driver cannot use (one on a fuse-blk
# device) leave the daemon serving everything; CREATE's refusals.
. "$CASES/lib.bash"
passthrough_of() { "$FUSE_BLK" list --json | tr -d '\n ' | sed 's/},{/}\n{/g' | grep "\"name\":\"$1\"" | grep -c '"passthrough":true' || true; }
finishes() {   # seconds command...: the command ends in time, successfully
    local limit=$1; shift
    timeout "$limit" "$@" || fail "did not finish within $limit s: $*"
}

"$VMTEST" passthrough-refusals | tee /tmp/refusals.out
[ "$(grep -c 'refused as expected' /tmp/refusals.out)" = 8 ] || fail "refusals"
[ "$(grep -c 'created as expected' /tmp/refusals.out)" = 2 ] || fail "creations"

mount -t tmpfs -o size=600M tmpfs /mnt
truncate -s 256M /mnt/pt.img
io=$(io_modes | cut -d' ' -f1)
dev=$(attach --name pt --queues 2 --io "$io" file:/mnt/pt.img)
[ "$(passthrough_of pt)" = 1 ] || fail "list --json does not show passthrough"
"$FUSE_BLK" list | grep -q "^pt .* kmod+pt " || fail "list does not show passthrough"
pid=$(daemon_pid pt)

# fio verify through the device: 64 MiB (fewer on the debug kernel) in
# 4 KiB and 1 MiB blocks. The
# daemon serves none of its reads and writes (its own statistics; its
# rings' completions would count its idle ticks too, one a second per
# queue, as many as the run is long).
served() {   # reads and writes the daemon of device pt has answered
    "$FUSE_BLK" stats pt --prometheus |
        awk '/^fuse_blk_requests_total\{.*op="(read|write)"/ { n += $2 } END { print n + 0 }'
}
before=$(served)
for bs in 4k 1M; do
    fio --name=verify --filename="$dev" --ioengine=libaio --direct=1 \
        --iodepth=16 --rw=randwrite --bs="$bs" --size="$(scaled_mib 64)M" \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
        --verify_state_save=0 --output=/tmp/fio.out || { cat /tmp/fio.out; fail "fio $bs"; }
done
served_by_daemon=$(( $(served) - before ))
echo "the daemon served $served_by_daemon of the reads and writes of $(scaled_mib 64) MiB each of 4 KiB and 1 MiB I/O"
[ "$served_by_daemon" = 0 ] || fail "reads and writes reached the daemon ($served_by_daemon)"

# What the device writes is in the image, and the other way round.
random_file /tmp/a 4
dd if=/tmp/a of="$dev" bs=1M seek=8 oflag=direct status=none
cmp <(dd if=/mnt/pt.img bs=1M skip=8 count=4 status=none) /tmp/a || fail "image after a device write"
random_file /tmp/b 4
dd if=/tmp/b of=/mnt/pt.img bs=1M seek=16 conv=notrunc status=none
cmp <(dd if="$dev" bs=1M skip=16 count=4 iflag=direct status=none) /tmp/b || fail "device after an image write"

# Daemon stopped: reads and writes complete, a flush waits for it.
kill -STOP "$pid"
finishes 20 dd if=/tmp/a of="$dev" bs=1M seek=32 oflag=direct status=none
finishes 20 dd if="$dev" of=/dev/null bs=1M skip=32 count=4 iflag=direct status=none
dd if=/tmp/a of="$dev" bs=1M seek=40 conv=fsync status=none &
flush=$!
sleep 3
kill -0 "$flush" 2>/dev/null || fail "a flush completed without the daemon"
kill -CONT "$pid"
finishes 20 tail --pid="$flush" -f /dev/null
wait "$flush" || fail "the flush failed"
cmp <(dd if=/mnt/pt.img bs=1M skip=40 count=4 status=none) /tmp/a || fail "image after the flush"
detach pt

# ext4 on a passthrough device: handoffs under a verifying load, then the
# daemon killed and recovered; fsck clean, no I/O errors.
mount_image_device ptfs /mnt/ptfs.img
[ "$(passthrough_of ptfs)" = 1 ] || fail "ptfs: no passthrough"
start_load /tmp/mnt
for i in $(seq 5); do
    "$FUSE_BLK" handoff ptfs > /dev/null || fail "handoff $i"
    sleep 0.3
done
[ "$(passthrough_of ptfs)" = 1 ] || fail "the successor does not show passthrough"
pid=$(daemon_pid ptfs)
kill -9 "$pid"
while [ -e "/proc/$pid" ]; do sleep 0.05; done
sleep 1
attach --recover ptfs file:/mnt/ptfs.img > /dev/null || fail "recover"
sleep 1
stop_load
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck"
no_io_errors
detach ptfs

# An image on a file system of another fuse-blk device: the driver refuses
# it (its I/O could wait on itself), and the daemon serves everything.
lower=$(attach --name lower mem:128M)
mkfs.ext4 -q "$lower"
mkdir -p /tmp/lower
mount "$lower" /tmp/lower
truncate -s 32M /tmp/lower/nested.img
dev=$(attach --name nested "file:/tmp/lower/nested.img")
[ "$(passthrough_of nested)" = 0 ] || fail "passthrough granted on a fuse-blk device"
ext4_roundtrip "$dev" 8
detach nested
umount /tmp/lower
detach lower

# Destroyed with passthrough I/O in flight: the I/O fails, nothing hangs.
dev=$(attach --name busy --queues 2 file:/mnt/pt.img)
fio --name=load --filename="$dev" --ioengine=libaio --direct=1 --iodepth=32 \
    --rw=randrw --bs=64k --time_based --runtime=60 --output=/tmp/fio.out &
fio=$!
sleep 2
"$VMTEST" destroy "$(cat /sys/block/"${dev#/dev/}"/fuse_blk/dev_id)"
for _ in $(seq 300); do kill -0 "$fio" 2>/dev/null || break; sleep 0.1; done
kill -0 "$fio" 2>/dev/null && fail "fio still runs 30 s after the destroy"
if wait "$fio"; then fail "fio did not see the device go"; fi
detach busy 2>/dev/null || true
[ ! -e "$dev" ] || fail "device left"
rm -f /mnt/pt.img /mnt/ptfs.img
umount /mnt
