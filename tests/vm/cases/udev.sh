# udev learns a fuse-blk device's content once it goes live: the kernel
# sends a change uevent after setting the capacity (set_capacity_and_notify
# sends none for a change from zero), and with systemd-udevd running the
# /dev/disk/by-uuid link of a filesystem on the device appears at attach
# and goes at detach, as for a loop device; the project's rules name each
# device /dev/fuseblk/NAME on both paths.
. "$CASES/lib.bash"
udevd=/lib/systemd/systemd-udevd
[ -x "$udevd" ] && command -v udevadm >/dev/null ||
    skip_rest "systemd-udevd and udevadm (Debian's udev package) are not installed"
mount -t tmpfs -o size=80M tmpfs /mnt
udevd_running=0
cleanup() {   # also after a failure: nothing of the case is left
    "$FUSE_BLK" detach ud 2>/dev/null || true
    "$FUSE_BLK" detach uds 2>/dev/null || true
    [ "$udevd_running" = 0 ] || stop_udevd
    umount /mnt
}
trap cleanup EXIT
truncate -s 64M /mnt/udev.img

# The kernel's own events, without udevd.
udevadm monitor --kernel --subsystem-match=block > /tmp/uevents &
monitor=$!
sleep 1
dev=$(attach --name ud "file:/mnt/udev.img")
sleep 2
kill "$monitor"
grep -E "change +/devices/.*/${dev#/dev/} \(block\)" /tmp/uevents ||
    { cat /tmp/uevents; fail "no change uevent for ${dev#/dev/} once it went live"; }
uuid=6b1f5e0c-3d2a-4c51-9f0e-2b7d4a8c9e11
mkfs.ext4 -q -U "$uuid" "$dev"
detach ud

# With udevd and the project's rules (userspace/cli/udev): the device's
# name and its filesystem's link appear for a fresh attach, and go.
mkdir -p /run/udev/rules.d
cp "$CASES/../../../userspace/cli/udev/61-fuse-blk.rules" /run/udev/rules.d/
"$udevd" --daemon
udevd_running=1
udevadm settle -t 30
dev=$(attach --name ud "file:/mnt/udev.img")
udevadm settle -t 30
[ "$(readlink -f /dev/fuseblk/ud)" = "$dev" ] ||
    { ls -l /dev/fuseblk/ 2>&1; fail "/dev/fuseblk/ud does not name $dev"; }
[ "$(readlink -f "/dev/disk/by-uuid/$uuid")" = "$dev" ] ||
    { ls -l /dev/disk/by-uuid/ 2>&1; fail "/dev/disk/by-uuid/$uuid does not name $dev"; }
detach ud
udevadm settle -t 30
[ ! -e /dev/fuseblk/ud ] || fail "/dev/fuseblk/ud left after detach"
[ ! -e "/dev/disk/by-uuid/$uuid" ] || fail "/dev/disk/by-uuid/$uuid left after detach"

# The stock path's loop device gets the same name.
sdev=$("$FUSE_BLK" attach --transport loop --name uds mem:16M)
udevadm settle -t 30
[ "$(readlink -f /dev/fuseblk/uds)" = "$sdev" ] ||
    { ls -l /dev/fuseblk/ 2>&1; fail "/dev/fuseblk/uds does not name $sdev"; }
"$FUSE_BLK" detach uds
udevadm settle -t 30
[ ! -e /dev/fuseblk/uds ] || fail "/dev/fuseblk/uds left after detach"
