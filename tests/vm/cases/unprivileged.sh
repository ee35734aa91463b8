# Devices owned by unprivileged users (module parameter unprivileged): off
# by default, a user is refused with "permission denied" and nothing is
# made; on, a member of the control device's group creates and serves a
# device of its own, which udev (the project's rules) gives to that user;
# another user cannot inspect, attach to, hand over, resize or destroy it,
# root can; the per-user limit holds; passthrough and odd names are refused.
. "$CASES/lib.bash"
module_offers unprivileged || skip_rest "the module does not offer FUSE_BLK_F_UNPRIVILEGED"
command -v setpriv > /dev/null || skip_rest "setpriv (util-linux) is not installed"
param=/sys/module/fuse_blk/parameters
A=4001 B=4002 GROUP=4100
# Users without a passwd entry: numeric ids, their own runtime directories.
as_user() {   # uid command...
    local uid=$1
    shift
    FUSE_BLK_RUNTIME_DIR=/tmp/run-$uid setpriv --reuid="$uid" --regid="$uid" \
        --groups="$GROUP" --inh-caps=-all -- "$@"
}
mkdir -p /tmp/run-$A /tmp/run-$B
chown $A:$A /tmp/run-$A
chown $B:$B /tmp/run-$B
chgrp $GROUP /dev/fuse-blk
chmod 0660 /dev/fuse-blk
udevd_running=0
cleanup() {   # also after a failure: nothing of the case is left
    echo 0 > $param/unprivileged
    echo 8 > $param/max_devices_per_user
    for n in a1 a2 a3; do as_user $A "$FUSE_BLK" detach $n 2>/dev/null || true; done
    [ "$udevd_running" = 0 ] || stop_udevd
    chgrp root /dev/fuse-blk
    chmod 0600 /dev/fuse-blk
}
trap cleanup EXIT
devices_now() { ls /sys/block | grep -c '^fuseblk' || true; }
before=$(devices_now)

# Off (the default): permission denied, nothing made.
[ "$(cat $param/unprivileged)" = N ] || fail "unprivileged devices are on by default"
if as_user $A "$FUSE_BLK" attach --name a1 mem:16M 2>/tmp/err; then fail "a user attached with the option off"; fi
grep -q "permission denied" /tmp/err || fail "option off says: $(cat /tmp/err)"
[ "$(wc -l < /tmp/err)" = 1 ] || fail "not one line: $(cat /tmp/err)"
[ "$(devices_now)" = "$before" ] || fail "a device was left"
[ -z "$(ls /tmp/run-$A)" ] || fail "state was left: $(ls /tmp/run-$A)"

# On, with the project's udev rules running.
echo 1 > $param/unprivileged
echo 2 > $param/max_devices_per_user
if [ -x /lib/systemd/systemd-udevd ] && command -v udevadm > /dev/null; then
    mkdir -p /run/udev/rules.d
    cp "$CASES/../../../userspace/cli/udev/61-fuse-blk.rules" /run/udev/rules.d/
    /lib/systemd/systemd-udevd --daemon
    udevd_running=1
else
    skip_part "systemd-udevd is not installed: the device node's owner is not checked"
fi
dev=$(as_user $A "$FUSE_BLK" attach --name a1 mem:16M)
id=${dev#/dev/fuseblk}
[ "$(cat /sys/block/fuseblk$id/fuse_blk/owner)" = $A ] || fail "sysfs owner: $(cat /sys/block/fuseblk$id/fuse_blk/owner)"
as_user $A "$VMTEST" info "$id" > /dev/null || fail "the owner cannot inspect its device"
if [ "$udevd_running" = 1 ]; then
    udevadm settle -t 30
    [ "$(stat -c %u "$dev")" = $A ] || fail "$dev belongs to $(stat -c %u "$dev"), not $A"
    [ ! -e /dev/fuseblk/a1 ] || fail "an unprivileged device got a /dev/fuseblk link"
    # The owner uses it as its own disk.
    as_user $A dd if=/dev/urandom of="$dev" bs=1M count=4 oflag=direct status=none ||
        fail "the owner cannot write its device"
    as_user $A cmp -n $((4 << 20)) "$dev" "$dev" || fail "the owner cannot read its device"
fi
# A file: backend as a user gets no passthrough (the module refuses it).
truncate -s 16M /tmp/a2.img
chown $A /tmp/a2.img
as_user $A "$FUSE_BLK" attach --name a2 file:/tmp/a2.img > /dev/null
[ "$(FUSE_BLK_RUNTIME_DIR=/tmp/run-$A listed a2 passthrough)" != true ] || fail "an unprivileged device has passthrough"
# The limit: 2 devices.
if as_user $A "$FUSE_BLK" attach --name a3 mem:16M 2>/tmp/err; then fail "a third device past the limit"; fi
grep -q "max_devices_per_user" /tmp/err || fail "limit says: $(cat /tmp/err)"

# Another user, who may open the control device too, gets EPERM for each.
for cmd in "info $id" "destroy $id" "takeover-queue $id" "resize $id 32M"; do
    # shellcheck disable=SC2086
    if as_user $B "$VMTEST" $cmd 2>/tmp/err; then fail "user $B: $cmd worked on $A's device"; fi
    grep -q "not permitted" /tmp/err || fail "user $B: $cmd says: $(cat /tmp/err)"
done
if as_user $B "$VMTEST" resize "$id" 32M 2>/dev/null; then fail "resized by another user"; fi
[ "$(cat /sys/block/fuseblk$id/size)" = $((16 << 11)) ] || fail "another user changed the size"
# Its owner resizes, hands over and detaches its devices; root inspects them.
as_user $A "$FUSE_BLK" resize a1 32M || fail "the owner cannot resize"
[ "$(cat /sys/block/fuseblk$id/size)" = $((32 << 11)) ] || fail "size after the owner's resize"
old=$(FUSE_BLK_RUNTIME_DIR=/tmp/run-$A daemon_pid a2)
as_user $A "$FUSE_BLK" handoff a2 || fail "the owner cannot hand over"
[ "$(FUSE_BLK_RUNTIME_DIR=/tmp/run-$A daemon_pid a2)" != "$old" ] || fail "a2 has its old daemon"
as_user $A "$FUSE_BLK" detach a2 || fail "the owner cannot detach"
"$VMTEST" info "$id" > /dev/null || fail "root cannot inspect a user's device"
# A name that is not a plain word is refused by the module itself (it
# reaches udev's rules), whatever the program.
for name in ../sda 'a/b' .hidden; do
    if as_user $A "$VMTEST" create "$name" 2>/tmp/err; then fail "the module took the name $name"; fi
    grep -q "Invalid argument" /tmp/err || fail "name $name: $(cat /tmp/err)"
done
as_user $A "$VMTEST" create plain-name_1.x || fail "a plain name was refused"
# Root may destroy it; the owner's daemon then ends.
"$VMTEST" destroy "$id"
for _ in $(seq 100); do [ -e "/sys/block/fuseblk$id" ] || break; sleep 0.1; done
[ ! -e "/sys/block/fuseblk$id" ] || fail "root could not destroy a user's device"
as_user $A "$FUSE_BLK" detach a1 2>/dev/null || true
[ "$(devices_now)" = "$before" ] || fail "devices were left"
