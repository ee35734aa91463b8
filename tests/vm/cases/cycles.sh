# 20 create/destroy cycles (fewer on the debug kernel, whose kmemleak
# finds leaks): device numbers and memory come back.
. "$CASES/lib.bash"
slab() { awk '/^Slab:/ {print $2}' /proc/meminfo; }
sync; echo 3 > /proc/sys/vm/drop_caches
before=$(slab)
for i in $(seq "$(repeats 20)"); do
    dev=$(attach --name cycle --queues 2 mem:16M)
    [ "$dev" = /dev/fuseblk0 ] || fail "cycle $i got $dev"
    dd if=/dev/urandom of="$dev" bs=64k count=16 oflag=direct status=none
    detach cycle
done
sync; echo 3 > /proc/sys/vm/drop_caches
after=$(slab)
echo "slab before ${before} kB, after ${after} kB"
[ $(( after - before )) -lt 4096 ] || fail "slab grew by $(( after - before )) kB"
