# `attach --transport dm-user BACKEND`: a backend's handler as a dm-user
# daemon (compat/dm-user channel.rs). This kernel has no dm-user target, so
# the bridge stands in, in the same daemon: handler -> dm-user messages ->
# /dev/dm-user/NAME (CUSE) -> bridge -> fuse-blk device. mem: and file:
# backends: ext4 with fsck, fio verify, discard, stats counting the
# handler's requests once, detach leaving nothing; the child killed with
# kill -9 under a verifying load, started again by the bridge; handoffs
# under the load, each to a new child (the last from a copy of the
# program); --read-only; a killed daemon cleaned up by detach; bad input
# refused in one line.
. "$CASES/lib.bash"
trap 'if [ $? != 0 ]; then for f in /run/fuse-blk/*/daemon.log; do [ -s "$f" ] && { echo "--- $f"; tail -n 20 "$f"; }; done; dmesg | tail -n 30; fi' EXIT
# A copy of our own: the shared build tree may be rebuilt meanwhile.
cp "$FUSE_BLK" /tmp/fuse-blk
FUSE_BLK=/tmp/fuse-blk
dmu() { "$FUSE_BLK" attach --transport dm-user "$@"; }
step() { echo "$(date +%T) $*"; }
if [ -e /sys/module/dm_user ]; then skip_rest "dm-user's own target is loaded: this case is the bridge's"; fi

# The daemon's child, which serves the node with the handler.
child_of() { pgrep -P "$1" -f serve-dm-user-node || fail "no child of $1 serves the node"; }
# Nothing of a device is left: no state, node, block device or daemon.
nothing_left() {   # name device pid child
    local p
    [ ! -e "/run/fuse-blk/$1" ] || fail "$1: state left"
    [ ! -e "/dev/dm-user/$1" ] || fail "$1: node left"
    [ ! -e "$2" ] || fail "$1: $2 left"
    for p in "$3" "$4"; do
        # Exited; the guest's init may leave it a zombie.
        ! ps -o stat= -p "$p" | grep -qv Z || fail "$1: process $p still runs"
    done
    [ -z "$("$FUSE_BLK" list --json | tr -d '[]\n ')" ] || fail "$1: still listed"
}
# One-line refusal of `attach --transport dm-user ARGS`; prints it.
refused() {
    local out
    if out=$(dmu "$@" 2>&1); then fail "attach --transport dm-user $*: $out"; fi
    [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] || fail "not one line: $out"
    [ -z "$("$FUSE_BLK" list --json | tr -d '[]\n ')" ] || fail "$*: left listed"
    ! ls /dev/dm-user/* 2>/dev/null || fail "$*: a node left"
    echo "$out"
}
verify() {   # device job: fio verify, two jobs of random writes 4-256 KiB
    fio --name="$2" --filename="$1" --ioengine=libaio --direct=1 --iodepth=16 --numjobs=2 \
        --rw=randwrite --bsrange=4k-256k --size=4M --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --randrepeat=0 --verify_state_save=0 --offset_increment=24M \
        --output=/tmp/"$2".out || { cat /tmp/"$2".out; fail "fio $2 on $1"; }
}

step "without cuse, and without dm-user's target"
modprobe -r cuse 2>/dev/null || true
if [ -e /dev/cuse ]; then
    skip_part "attach without cuse: cuse is built in"
else
    out=$(refused --name nocuse mem:64M)
    echo "$out"
    printf '%s' "$out" | grep -q 'cuse' || fail "cuse not named: $out"
    printf '%s' "$out" | grep -q 'dm-user' || fail "dm-user not named: $out"
fi
modprobe cuse

step "bad input"
refused --name bad dm-user:inner:64M | grep -q 'dm-user: backend' || fail "dm-user: backend"
refused --recover bad mem:64M | grep -q 'no attached device' || fail "--recover"
refused --name bad mem:1000 | grep -q 'not a multiple' || fail "bad size"

step "mem: on the bridge"
dev=$(dmu --name dmt --queues 4 mem:64M)
echo "attached $dev"
pid=$(daemon_pid dmt)
child=$(child_of "$pid")
[ -b "$dev" ] || fail "$dev is not a block device"
[ -c /dev/dm-user/dmt ] || fail "/dev/dm-user/dmt is not a character device"
[ "$(cat /sys/block/"${dev#/dev/}"/size)" = $((64 << 11)) ] || fail "size"
"$FUSE_BLK" list
[ "$(listed dmt transport)" = dm-user+bridge ] || fail "list: $("$FUSE_BLK" list --json)"
[ "$(listed dmt backend)" = mem:64M ] || fail "list: $("$FUSE_BLK" list --json)"
# The daemon's child serves the node with four descriptors.
[ "$(ls -l /proc/"$child"/fd | grep -c 'dm-user/dmt')" = 4 ] || fail "not four descriptors on the node"
# 4 MiB written: the daemon's counters (the bridge's requests, the same
# the handler serves) say 4 MiB.
dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none
"$FUSE_BLK" stats dmt --prometheus > /tmp/prom
grep -qx 'fuse_blk_bytes_total{device="dmt",op="write"} 4194304' /tmp/prom ||
    { grep bytes_total /tmp/prom; fail "stats: writes not counted once"; }
ext4_roundtrip "$dev" 4
# Mounted: detach refuses in one line and the device stays.
mount "$dev" /tmp/mnt
if out=$(detach dmt 2>&1); then fail "detach of a mounted device: $out"; fi
echo "$out" | grep -q 'in use' || fail "detach while mounted: $out"
umount /tmp/mnt
verify "$dev" mem
blkdiscard -o 8M -l 1M "$dev" || fail "discard"
[ "$(dd if="$dev" bs=1M skip=8 count=1 iflag=direct status=none | tr -d '\0' | wc -c)" = 0 ] ||
    fail "discarded range not zeros"
# Its contents are in its child: not handed over.
if out=$("$FUSE_BLK" handoff dmt 2>&1); then fail "handoff of a mem: device: $out"; fi
echo "$out" | grep -q 'mem:' || fail "handoff of mem: $out"
step "detach"
detach dmt
nothing_left dmt "$dev" "$pid" "$child"

step "file: on the bridge"
img=/tmp/dmt.img
rm -f "$img"; truncate -s 128M "$img"
dev=$(dmu --name dmf --queues 2 "file:$img")
pid=$(daemon_pid dmf)
child=$(child_of "$pid")
[ "$(listed dmf transport)" = dm-user+bridge ] || fail "list: $("$FUSE_BLK" list --json)"
verify "$dev" file
mkfs.ext4 -q "$dev"
mount "$dev" /tmp/mnt
random_file /tmp/mnt/kept 8
kept=$(sum /tmp/mnt/kept)
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck on file:"
detach dmf
nothing_left dmf "$dev" "$pid" "$child"
# What was written is in the image: read back through another path.
sdev=$(attach --name dmimg "file:$img")
mount "$sdev" /tmp/mnt
[ "$(sum /tmp/mnt/kept)" = "$kept" ] || fail "the image does not hold what was written"
umount /tmp/mnt
detach dmimg

step "file: the child killed under a load: the bridge starts another"
img=/tmp/dmr.img
rm -f "$img"; truncate -s 256M "$img"
dev=$(dmu --log-level info --name dmr --queues 2 "file:$img")
pid=$(daemon_pid dmr)
log=/run/fuse-blk/dmr/daemon.log
mkfs.ext4 -q "$dev"
mount "$dev" /tmp/mnt
start_load /tmp/mnt
# The new child of $1, not $2; waits up to 10 s for it.
new_child() {
    local c
    for _ in $(seq 100); do
        c=$(pgrep -P "$1" -f serve-dm-user-node) && [ "$c" != "$2" ] && { echo "$c"; return; }
        sleep 0.1
    done
    fail "no child of $1 other than $2: $(ps -o pid=,stat=,args= --ppid "$1")"
}
for i in 1 2 3 4 5; do
    sleep 2
    child=$(child_of "$pid")
    kill -9 "$child"
    new=$(new_child "$pid" "$child")
    echo "kill -9 $i: child $child, then $new"
    [ "$(listed dmr transport)" = dm-user+bridge ] || fail "not listed after kill $i: $("$FUSE_BLK" list --json)"
    [ "$(daemon_pid dmr)" = "$pid" ] || fail "the daemon changed"
done
[ "$(grep -c 'exited (signal: 9' "$log")" = 5 ] || { cat "$log"; fail "five deaths not logged"; }

step "file: five handoffs under the load"
# The last one from a copy of the program, as an upgrade would be.
cp "$FUSE_BLK" /tmp/fuse-blk-next
for i in 1 2 3 4 5; do
    sleep 1
    old=$(child_of "$pid")
    prog=$FUSE_BLK; [ "$i" = 5 ] && prog=/tmp/fuse-blk-next
    "$prog" handoff dmr || fail "handoff $i"
    new=$(child_of "$pid")
    [ "$new" != "$old" ] || fail "handoff $i: the child is still $old"
    ! ps -o stat= -p "$old" | grep -qv Z || fail "handoff $i: the old child $old still runs"
    [ "$(readlink /proc/"$new"/exe)" = "$prog" ] || fail "handoff $i: the child runs $(readlink /proc/"$new"/exe), not $prog"
    [ "$(daemon_pid dmr)" = "$pid" ] || fail "the daemon changed"
    [ "$(listed dmr transport)" = dm-user+bridge ] || fail "not listed after handoff $i"
    echo "handoff $i: child $old, then $new ($prog)"
done
stop_load
# Each old child ended on SIGTERM, none had to be killed or failed.
grep -E 'replaced daemon|did not exit' "$log" && fail "a replaced child did not end cleanly"
[ "$(grep -c 'SIGTERM: answering' "$log")" = 5 ] || { cat "$log"; fail "five SIGTERMs not logged"; }
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck after the kills and handoffs"
# --recover of a bridge device is refused: its daemon is the bridge.
if out=$(dmu --recover dmr "file:$img" 2>&1); then fail "--recover of a bridge device: $out"; fi
echo "$out" | grep -q 'cannot be recovered' || fail "--recover of a bridge device: $out"
step "detach while a new child is awaited"
child=$(child_of "$pid")
kill -9 "$child"
detach dmr
nothing_left dmr "$dev" "$pid" "$child"
pgrep -f 'serve-dm-user-node /dev/dm-user/dmr' && fail "a child of dmr is left"

step "--read-only"
# The bridge's device is read-only and the child's handler opened so:
# writes fail at the block device, reads are served, the image is as it
# was.
img=/tmp/dmro.img
rm -f "$img"; truncate -s 64M "$img"
head -c 4M /dev/urandom | dd of="$img" conv=notrunc status=none
before=$(sum "$img")
dev=$(dmu --read-only --name dmro --queues 2 "file:$img")
pid=$(daemon_pid dmro)
child=$(child_of "$pid")
[ "$(blockdev --getro "$dev")" = 1 ] || fail "$dev is not read-only"
[ "$(listed dmro read_only)" = true ] || fail "list: $("$FUSE_BLK" list --json)"
fd=$(ls -l /proc/"$child"/fd | awk '/dmro.img/ {print $9; exit}')
[ -n "$fd" ] || fail "the child does not hold the image open"
flags=$(awk '/^flags/ {print $2}' /proc/"$child"/fdinfo/"$fd")
[ $(( 0$flags & 3 )) = 0 ] || fail "the child opened the image for writing (flags $flags)"
if out=$(dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct 2>&1); then
    fail "a write to the read-only device: $out"
fi
echo "write refused: $out"
echo "$out" | grep -Eq 'Read-only|Operation not permitted|Permission denied' || fail "write: $out"
cmp <(dd if="$dev" bs=1M count=4 iflag=direct status=none) <(head -c 4M "$img") || fail "read back"
"$FUSE_BLK" stats dmro --prometheus > /tmp/prom
grep -E 'op="write"\} [1-9]' /tmp/prom && fail "writes reached the handler"
detach dmro
nothing_left dmro "$dev" "$pid" "$child"
[ "$(sum "$img")" = "$before" ] || fail "the read-only image changed"

step "a killed daemon"
# The daemon dies: its node goes, its child's reads fail and it exits;
# detach removes the device it left.
dev=$(dmu --name dmk mem:16M)
pid=$(daemon_pid dmk)
child=$(child_of "$pid")
kill -9 "$pid"
gone() { ! ps -o stat= -p "$1" | grep -qv Z; }
for _ in $(seq 100); do gone "$pid" && gone "$child" && break; sleep 0.1; done
gone "$pid" || fail "the killed daemon is still there: $(ps -o stat=,wchan= -p "$pid")"
gone "$child" || fail "the killed daemon's child is still there"
detach dmk 2>&1 | grep -q 'had died' || fail "detach of a killed daemon"
nothing_left dmk "$dev" "$pid" "$child"

no_io_errors
