# fio with verification on the raw device: 512- and 4096-byte blocks,
# more than one queue.
. "$CASES/lib.bash"
for lbs in 512 4096; do
    dev=$(attach --name fio --queues 2 --block-size "$lbs" mem:128M)
    [ "$(blockdev --getss "$dev")" = "$lbs" ] || fail "logical block size"
    [ "$(ls /sys/block/fuseblk0/mq | wc -l)" = 2 ] || fail "two hardware queues"
    for job in "randwrite 4k" "randwrite 64k" "randrw 16k"; do
        set -- $job
        fio --name=verify --filename="$dev" --ioengine=libaio --direct=1 \
            --iodepth=16 --numjobs=1 --rw="$1" --bs="$2" --size=64M \
            --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
            --verify_state_save=0 --output=/tmp/fio.out || { cat /tmp/fio.out; fail "fio $job bs $lbs"; }
    done
    detach fio
done
