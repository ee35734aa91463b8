# Two partitions made with sfdisk, a file system on the second.
. "$CASES/lib.bash"
dev=$(attach --name parts mem:128M)
printf 'label: gpt\nsize=32M\nsize=64M\n' | sfdisk -q "$dev"
for _ in $(seq 50); do [ -b "${dev}p2" ] && break; sleep 0.1; done
[ -b "${dev}p1" ] && [ -b "${dev}p2" ] || fail "partitions not created"
[ "$(blockdev --getsize64 "${dev}p2")" = $((64 << 20)) ] || fail "p2 size"
ext4_roundtrip "${dev}p2" 8
detach parts
