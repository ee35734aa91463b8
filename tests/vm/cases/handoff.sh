# 20 handoffs in a row (fewer on the debug kernel: lib.bash's repeats)
# under a verifying fio load on mounted ext4: zero I/O
# errors, verification clean, fsck clean. Every request goes through the
# daemons (passthrough.sh hands over a passthrough device).
. "$CASES/lib.bash"
image=/tmp/handoff.img
mount_image_device ho "$image" --no-passthrough
start_load /tmp/mnt
for i in $(seq "$(repeats 20)"); do
    "$FUSE_BLK" handoff ho > /dev/null || fail "handoff $i"
    sleep 0.3
done
stop_load
"$FUSE_BLK" list | grep -q "^ho .*running" || fail "not running after the handoffs"
umount /tmp/mnt
e2fsck -fn "$dev" || fail "fsck"
no_io_errors
detach ho

# The successor serves as its predecessor was told to: read/write stays
# read/write (else `auto` would pick io_uring), polling stays off; and the
# default, io_uring, stays io_uring.
rings() { ring_fds "$1" | wc -l; }   # pid: io_uring instances it holds
names=rw
attach --name rw --io rw --ring-poll-us 0 null:64M > /dev/null || fail "attach rw"
if module_offers uring; then
    attach --name ur null:64M > /dev/null || fail "attach uring"
    names="rw ur"
else
    skip_part "the default (io_uring) kept across a handoff: the module offers no io_uring channels"
fi
for name in $names; do
    old=$(daemon_pid $name)
    "$FUSE_BLK" handoff $name > /dev/null || fail "handoff of $name"
    new=$(daemon_pid $name)
    [ "$new" != "$old" ] || fail "$name: still pid $old"
    echo "$name: $(rings "$new") rings, io $(listed $name io), poll $(listed $name ring_poll_us)"
done
[ "$(rings "$(daemon_pid rw)")" = 0 ] || fail "the read/write device's successor uses io_uring"
[ "$(listed rw io)" = rw ] && [ "$(listed rw ring_poll_us)" = 0 ] || fail "rw: recorded wrong"
if [ "$names" = "rw ur" ]; then
    [ "$(rings "$(daemon_pid ur)")" -gt 0 ] || fail "the io_uring device's successor does not"
    [ "$(listed ur io)" = uring ] && [ "$(listed ur ring_poll_us)" = 500 ] || fail "ur: recorded wrong"
    detach ur
fi
detach rw
