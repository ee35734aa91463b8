# Handoffs of a fuser-adapter device served over read/write channels, four
# queues, under a verifying fio load on mounted ext4: zero I/O errors. Each
# successor takes the queues over one at a time, a pause between two, so the
# old daemon's channels are retired one by one while its other queues keep
# serving: its handler must stay alive until its last queue has gone (the
# engine used to destroy it, closing the fuser session, at the first
# queue's FUSE_DESTROY, and the queues not yet taken over failed their
# requests).
. "$CASES/lib.bash"
image=/tmp/fuser-handoff.img
rm -f "$image"; truncate -s 256M "$image"
# Starts a daemon with `fuse-blk-vmtest ARGS...`; sets $daemon and $dev once
# it serves.
start_daemon() {
    rm -f /tmp/fuser-handoff.out
    "$VMTEST" "$@" > /tmp/fuser-handoff.out &
    daemon=$!
    for _ in $(seq 300); do [ -s /tmp/fuser-handoff.out ] && break; sleep 0.1; done
    dev=$(cat /tmp/fuser-handoff.out)
    [ -b "$dev" ] || fail "no device from $*"
}
start_daemon fuser-file "$image" 4
id=${dev#/dev/fuseblk}
mkfs.ext4 -q "$dev"
mkdir -p /tmp/mnt
mount "$dev" /tmp/mnt
dmesg_mark=$(dmesg | wc -l)
start_load /tmp/mnt
for i in $(seq "$(repeats 8)"); do
    old=$daemon
    start_daemon fuser-file-takeover "$image" "$id"
    wait "$old" || fail "handoff $i: the old daemon failed"
    sleep 0.5
done
stop_load
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck"
no_io_errors
"$VMTEST" destroy "$id"
wait "$daemon"
