# dm-user's ABI on the module: `attach dm-user:NAME:SIZE` makes
# /dev/dm-user/NAME (CUSE), on which a dm-user daemon written in C against
# the ABI alone (tests/dm-user/daemon.c) serves the block device: ext2 with
# files read back through a fresh mount, fio verify on the raw device with
# one descriptor and with four in threads answering out of order, requests
# waiting for a daemon, garbage answers refused with EINVAL, and detach
# ending the daemon through ENOTBLK.
. "$CASES/lib.bash"
# On failure, what the daemons said.
trap 'if [ $? != 0 ]; then for f in /tmp/daemon*.log /tmp/rust*.out; do [ -s "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done; fi' EXIT
root=$(cd "$CASES/../../.." && pwd)
# A copy of our own: the shared build tree may be rebuilt meanwhile.
cp "$FUSE_BLK" /tmp/fuse-blk
FUSE_BLK=/tmp/fuse-blk
daemon=/tmp/dm-user-daemon
cc -O2 -Wall -Wextra -Werror -pthread -o "$daemon" "$root/tests/dm-user/daemon.c"
node=/dev/dm-user/dmu

# Without CUSE: one line naming the module, nothing left behind.
modprobe -r cuse 2>/dev/null || true
if [ ! -e /dev/cuse ]; then
    if out=$(attach dm-user:nocuse:64M 2>&1); then fail "attach without cuse: $out"; fi
    echo "without cuse: $out"
    [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] || fail "not one line: $out"
    printf '%s' "$out" | grep -q 'cuse kernel module' || fail "no module named: $out"
    [ ! -e /run/fuse-blk/nocuse ] || fail "state left behind"
    ! ls /dev/fuseblk* 2>/dev/null || fail "device left behind"
fi
modprobe cuse

# The daemon starts at once: whatever opens the block device first (udev)
# has the kernel read its partition table, which waits for a daemon.
dev=$(attach dm-user:dmu:64M)
[ -c "$node" ] || fail "$node is not a character device"
# One descriptor; headers read in 7-byte pieces, data in 1000-byte ones
# (each piece is a round trip through CUSE: slow under emulation, so the
# amounts are small).
"$daemon" -p 1000 "$node" 64M 2> /tmp/daemon1.log &
d1=$!
echo "attached $dev"
step() { echo "$(date +%T) $*"; }
# fio verify on device $1 (job name $2): two jobs at depth $3, random
# writes of sizes $4, $5 each, 24 MiB apart.
two_job_verify() {
    fio --name="$2" --filename="$1" --ioengine=libaio --direct=1 --iodepth="$3" --numjobs=2 \
        --rw=randwrite --bsrange="$4" --size="$5" --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --randrepeat=0 --verify_state_save=0 --offset_increment=24M \
        --output=/tmp/"$2".out || { cat /tmp/"$2".out; fail "fio $2 on $1"; }
}
[ "$(cat /sys/block/"${dev#/dev/}"/size)" = $((64 << 11)) ] || fail "size"
"$FUSE_BLK" list
[ "$(listed dmu backend)" = dm-user:dmu:64M ] || fail "list: $("$FUSE_BLK" list --json)"

step "mkfs"
mkfs.ext2 -q "$dev"
mkdir -p /tmp/mnt
mount "$dev" /tmp/mnt
random_file /tmp/mnt/a 2
random_file /tmp/mnt/b 1
a=$(sum /tmp/mnt/a) b=$(sum /tmp/mnt/b)
umount /tmp/mnt
mount "$dev" /tmp/mnt
[ "$(sum /tmp/mnt/a)" = "$a" ] && [ "$(sum /tmp/mnt/b)" = "$b" ] || fail "checksums after remount"
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck"
step "fio, one descriptor"
fio --name=raw --filename="$dev" --ioengine=libaio --direct=1 --iodepth=8 --rw=randwrite \
    --bs=4k --size=1M --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 \
    --verify_state_save=0 --output=/tmp/fio1.out || { cat /tmp/fio1.out; fail "fio, one descriptor"; }
blkdiscard -o 0 -l 1M "$dev" || fail "discard"
[ "$(head -c 1M "$dev" | tr -d '\0' | wc -c)" = 0 ] || fail "discarded range not zeros"

# The daemon goes (its store with it); four descriptors in threads,
# 4000-byte pieces, answers out of order, take over.
# A read issued while no daemon has the node open waits for the next.
kill -9 "$d1"; wait "$d1" || true
dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct status=none &
early=$!
sleep 1
kill -0 "$early" 2>/dev/null || fail "a read completed with no daemon"
"$daemon" -t 4 -p 4000 -o "$node" 64M 2> /tmp/daemon2.log &
d2=$!
wait "$early" || fail "the waiting read failed"
step "fio, four descriptors"
two_job_verify "$dev" raw4 32 4k-32k 2M
kill -9 "$d2"; wait "$d2" || true

# A fuse-blk handler as the dm-user daemon (compat/dm-user channel.rs):
# fuse-blk's engine behind dm-user's ABI, here on the bridge, four
# descriptors. The same data tests as the C daemon's.
"$VMTEST" dm-user-serve "$node" 64M 4 > /tmp/rust1.out 2>&1 &
r1=$!
step "rust daemon: mkfs, files, fio"
ext4_roundtrip "$dev" 3
two_job_verify "$dev" rust 16 4k-256k 4M
blkdiscard -o 8M -l 1M "$dev" || fail "rust daemon: discard"
[ "$(dd if="$dev" bs=1M skip=8 count=1 iflag=direct status=none | tr -d '\0' | wc -c)" = 0 ] ||
    fail "rust daemon: discarded range not zeros"
kill -9 "$r1"; wait "$r1" || true

# Whole-message reads (one read(2) of 1 MiB per message), and garbage
# answers first: each gets EINVAL and nothing hangs.
"$daemon" -g -p 65536 "$node" 64M 2> /tmp/daemon3.log &
d3=$!
head -c 4M /dev/urandom > /tmp/data
step "whole messages, garbage"
dd if=/tmp/data of="$dev" bs=1M oflag=direct status=none || fail "write after garbage"
cmp <(dd if="$dev" bs=1M count=4 iflag=direct status=none) /tmp/data || fail "read back"
cat /tmp/daemon3.log
grep -q 'wrong answer type: EINVAL' /tmp/daemon3.log || fail "no wrong-type check"

# A second daemon, the Rust one, waiting beside it: detach ends both.
"$VMTEST" dm-user-serve "$node" 64M 1 > /tmp/rust2.out 2>&1 &
r2=$!
for _ in $(seq 100); do
    ls -l /proc/"$r2"/fd 2>/dev/null | grep -q dm-user && break
    sleep 0.1
done
ls -l /proc/"$r2"/fd | grep -q dm-user || fail "the rust daemon did not open $node"

step "detach"
detach dmu
wait "$d3" || fail "the daemon did not exit 0 on detach ($(cat /tmp/daemon3.log))"
grep -q 'the target is gone' /tmp/daemon3.log || fail "no ENOTBLK"
wait "$r2" || fail "the rust daemon did not exit 0 on detach ($(cat /tmp/rust2.out))"
grep -q 'the target is gone' /tmp/rust2.out || fail "rust daemon: no ENOTBLK ($(cat /tmp/rust2.out))"
[ ! -e "$node" ] || fail "$node left"
[ ! -e "$dev" ] || fail "$dev left"
[ -z "$("$FUSE_BLK" list --json | tr -d '[]\n ')" ] || fail "still listed"
no_io_errors

# --read-only: the block device refuses writes, which never reach the
# daemon (its store stays zeros, and the device's counters show none);
# reads are served.
step "read-only"
rdev=$(attach --read-only dm-user:dmro:16M)
"$daemon" /dev/dm-user/dmro 16M 2> /tmp/daemon5.log &
d5=$!
[ "$(blockdev --getro "$rdev")" = 1 ] || fail "$rdev is not read-only"
[ "$(listed dmro read_only)" = true ] || fail "list: $("$FUSE_BLK" list --json)"
if out=$(dd if=/dev/urandom of="$rdev" bs=4k count=1 oflag=direct 2>&1); then
    fail "a write to the read-only device: $out"
fi
echo "write refused: $out"
echo "$out" | grep -Eq 'Read-only|Operation not permitted|Permission denied' || fail "write: $out"
[ "$(dd if="$rdev" bs=1M count=16 iflag=direct status=none | tr -d '\0' | wc -c)" = 0 ] ||
    fail "the daemon's store was written"
"$FUSE_BLK" stats dmro --prometheus > /tmp/prom
grep -E 'bytes_total\{device="dmro",op="read"\} [1-9]' /tmp/prom || { cat /tmp/prom; fail "no read counted"; }
grep -E 'op="write"\} [1-9]' /tmp/prom && fail "writes reached the daemon"
detach dmro
wait "$d5" || fail "the read-only device's daemon did not exit 0 on detach ($(cat /tmp/daemon5.log))"
no_io_errors

# The stock path (FUSE file + loop device) under the same node: the C
# daemon with four threads, then the Rust one; fio verify, then ext4.
step "stock path"
sdev=$("$FUSE_BLK" attach --transport loop dm-user:dms:64M)
case $sdev in /dev/loop*) ;; *) fail "stock path attached $sdev" ;; esac
snode=/dev/dm-user/dms
"$daemon" -t 4 -p 65536 -o "$snode" 64M 2> /tmp/daemon4.log &
d4=$!
two_job_verify "$sdev" stock 16 4k-128k 4M
kill -9 "$d4"; wait "$d4" || true
"$VMTEST" dm-user-serve "$snode" 64M 2 > /tmp/rust3.out 2>&1 &
r3=$!
ext4_roundtrip "$sdev" 2
"$FUSE_BLK" detach dms
wait "$r3" || fail "stock path: the rust daemon did not exit 0 on detach ($(cat /tmp/rust3.out))"
[ ! -e "$snode" ] || fail "$snode left"
losetup -a | grep -q 'fuse-blk:dms' && fail "loop device left"
no_io_errors
