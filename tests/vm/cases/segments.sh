# A 1 MiB request reaches the daemon whole: the driver declares no segment
# limits of its own (it copies, it does not map for DMA), so the block
# layer's defaults (128 segments of 64 KiB) do not split requests made of
# scattered pages.
. "$CASES/lib.bash"
dev=$(attach --name segments mem:64M)
disk=${dev#/dev/}
q=/sys/block/$disk/queue
[ "$(cat "$q/max_segments")" = 65535 ] || fail "max_segments is $(cat "$q/max_segments")"
[ "$(cat "$q/max_segment_size")" = 4294967295 ] || fail "max_segment_size is $(cat "$q/max_segment_size")"
# Page-cache pages filled in random order are scattered in memory; their
# writeback sends bios of up to 256 of them (1 MiB), which the defaults
# would split in two.
read -r _ _ _ _ ios_before _ sectors_before _ < "/sys/block/$disk/stat"
fio --name=segments --filename="$dev" --ioengine=psync --direct=0 --rw=randwrite \
    --bs=4k --size=32M --end_fsync=1 --output=/tmp/segments.out
read -r _ _ _ _ ios _ sectors _ < "/sys/block/$disk/stat"
ios=$((ios - ios_before)) sectors=$((sectors - sectors_before))
echo "32 MiB of writeback reached the device as $ios requests of $((sectors / ios / 2)) KiB on average"
# 1 MiB requests average well over 768 KiB; split ones stay at 512 KiB.
[ $((sectors / ios)) -ge 1536 ] || fail "writeback requests average $((sectors / ios / 2)) KiB"
detach segments
