# fuse-blk@.service on a module device under a real systemd: the guest runs
# none as init, so the case boots systemd as PID 1 of new PID, mount and
# cgroup namespaces, as tests/tests/systemd.rs does on the host (its comment
# says how). start: the device exists when start returns; three reloads
# (handoffs through the module) under a verifying fio load on mounted ext4
# with no I/O error, systemd following each new daemon; stop while mounted:
# `down` refuses, the device serves on and detaches once unmounted; enabled,
# the device comes back when systemd boots again; last, an /etc/fstab entry
# as README.md writes it mounts the file system after the unit is ready at
# boot and unmounts it before the unit stops at poweroff.
. "$CASES/lib.bash"
for tool in /lib/systemd/systemd unshare nsenter systemd-analyze; do
    command -v "$tool" >/dev/null || skip_rest "$tool is missing (Debian's systemd and util-linux)"
done
work=/tmp/sd
mkdir -p $work/units $work/config $work/cg2 /tmp/mnt
mount -t cgroup2 none $work/cg2 2>/dev/null ||
    grep -q cgroup2 /proc/filesystems || skip_rest "the kernel has no cgroup2 for systemd"
mountpoint -q $work/cg2 || fail "mounting cgroup2"
sd=0 unshare_pid=0 boot=0 udevd_running=0
cleanup() {
    if [ "$sd" != 0 ]; then
        nsenter -t "$sd" -m -p systemctl poweroff 2>/dev/null || true
        gone_within 30 "$unshare_pid" || kill -9 "$unshare_pid" 2>/dev/null || true
        wait "$unshare_pid" 2>/dev/null || true
    fi
    [ "$udevd_running" = 0 ] || stop_udevd
    umount $work/udev-db 2>/dev/null || true
    umount /tmp/mnt 2>/dev/null || true
    "$FUSE_BLK" detach sdk 2>/dev/null || true
    find $work/cg2/fuse-blk-* -depth -type d -exec rmdir {} \; 2>/dev/null || true
    umount $work/cg2 2>/dev/null || true
}
trap cleanup EXIT

truncate -s 384M $work/disk.img
printf 'backend = file:%s\ntransport = kmod\nqueues = 2\nblock-size = 4096\nno-passthrough = yes\n' \
    $work/disk.img > $work/config/sdk.conf
unit="$CASES/../../../userspace/cli/systemd/fuse-blk@.service"
sed -e "s#/usr/local/bin/fuse-blk #$FUSE_BLK #" \
    -e "s#up --foreground %i#up --config-dir $work/config --foreground %i#" \
    -e "s#/etc/fuse-blk/%i.conf#$work/config/%i.conf#" \
    -e "s#WantedBy=local-fs.target#WantedBy=fuse-blk-test.target#" "$unit" > $work/units/fuse-blk@.service
grep -q "$work/config --foreground" $work/units/fuse-blk@.service || fail "the unit's ExecStart changed"
printf '[Unit]\nDescription=fuse-blk test\n' > $work/units/fuse-blk-test.target

# Waits are deadlines, not counts of tries: a try (nsenter, systemctl)
# takes long on the debug kernel. $1 seconds (times VM_SLOW) from now.
deadline() { echo $((SECONDS + $1 * ${VM_SLOW:-1})); }
# Whether process $2 has ended within $1 seconds (times VM_SLOW).
gone_within() {
    local end
    end=$(deadline "$1")
    while [ $SECONDS -lt "$end" ]; do kill -0 "$2" 2>/dev/null || return 0; sleep 0.1; done
    return 1
}
# Boots systemd; with $work/fstab there, as the namespace's /etc/fstab,
# with the guest's udev database (/run/udev, which systemd's device units
# follow) under the namespace's private /run.
boot_systemd() {
    boot=$((boot + 1))
    local cg=$work/cg2/fuse-blk-$boot etc_fstab=:
    mkdir "$cg"
    if [ -e $work/fstab ]; then
        mkdir -p $work/udev-db
        mountpoint -q $work/udev-db || mount --bind /run/udev $work/udev-db
        etc_fstab="mkdir -p /run/udev; mount --move $work/udev-db /run/udev; mount --bind $work/fstab /etc/fstab"
    fi
    sh -c "echo \$\$ > $cg/cgroup.procs && exec unshare --pid --fork --mount --cgroup --propagation private sh -c '
        set -e; mount -t tmpfs tmpfs /sys/fs/cgroup; mount -t cgroup2 cgroup2 /sys/fs/cgroup
        mount -t tmpfs tmpfs /run; $etc_fstab; mount -t proc proc /proc; mount --bind $work/units /etc/systemd/system
        exec env -i container=fuse-blk-test PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --system --unit=fuse-blk-test.target --show-status=no'" \
        > $work/systemd-$boot.log 2>&1 &
    unshare_pid=$!
    local end state=
    end=$(deadline 60)
    while [ $SECONDS -lt "$end" ]; do
        # unshare's child, PID 1 inside (pgrep: /proc/PID/task/*/children
        # needs CONFIG_PROC_CHILDREN, which the debug kernel lacks).
        sd=$(pgrep -P "$unshare_pid" | head -n 1 || true)
        if [ -n "$sd" ]; then
            state=$(nsenter -t "$sd" -m -p systemctl is-system-running 2>/dev/null || true)
            [ "$state" = running ] || [ "$state" = degraded ] && return 0
        fi
        kill -0 $unshare_pid 2>/dev/null || { cat $work/systemd-$boot.log; fail "systemd did not boot"; }
        sleep 0.1
    done
    [ -z "$sd" ] || nsenter -t "$sd" -m -p systemctl list-jobs --no-pager || true
    tail -n 30 $work/systemd-$boot.log
    fail "systemd did not come up within $((60 * ${VM_SLOW:-1})) s (state: ${state:-none})"
}
in_sd() { nsenter -t "$sd" -m -p "$@"; }
prop() { in_sd systemctl show --value -p "$2" "fuse-blk@$1.service"; }
sd_listed() { in_sd "$FUSE_BLK" list --json | tr -d '\n ' | sed 's/},{/}\n{/g' | grep "\"name\":\"$1\"" \
    | sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p"; }
# systemctl's commands that wait for their job (start, reload, stop),
# bounded: a job that never ends fails the case, with the unit's status.
sd_job() {
    in_sd timeout $((120 * ${VM_SLOW:-1})) systemctl "$@" && return 0
    in_sd systemctl status --no-pager fuse-blk@sdk || true
    fail "systemctl $*"
}
# Powers systemd off and waits for it to end.
power_off() {
    in_sd systemctl poweroff
    gone_within 60 "$unshare_pid" || { tail -n 30 $work/systemd-$boot.log; fail "systemd did not power off: $1"; }
    wait "$unshare_pid" || true
    sd=0
}
wait_until() {   # $1: what, rest: a command that must come true within 60 s
    local what=$1 end; shift
    end=$(deadline 60)
    while [ $SECONDS -lt "$end" ]; do "$@" && return 0; sleep 0.1; done
    in_sd systemctl status --no-pager fuse-blk@sdk || true
    fail "$what: not within $((60 * ${VM_SLOW:-1})) s"
}

boot_systemd
sd_job start fuse-blk@sdk
dev=$(sd_listed sdk device)
[ -b "$dev" ] || fail "no block device once start returned ($dev)"
case "$dev" in /dev/fuseblk*) ;; *) fail "$dev is not a module device" ;; esac
[ "$(prop sdk MainPID)" = "$(sd_listed sdk pid)" ] || fail "MainPID is not the daemon"

# Reloads under load: the mount is the guest's own (the daemon's check that
# the device is in use sees mounts in every namespace).
mkfs.ext4 -q "$dev"
mount "$dev" /tmp/mnt
dmesg_mark=$(dmesg | wc -l)
start_load /tmp/mnt
sleep 2
pids=$(sd_listed sdk pid)
for i in 1 2 3; do
    sd_job reload fuse-blk@sdk
    pid=$(sd_listed sdk pid)
    case " $pids " in *" $pid "*) fail "reload $i kept daemon $pid" ;; esac
    [ "$(prop sdk MainPID)" = "$pid" ] || fail "reload $i: systemd does not follow daemon $pid"
    [ "$(prop sdk ActiveState)" = active ] || fail "reload $i: the unit is not active"
    pids="$pids $pid"
    sleep 1
done
stop_load
no_io_errors

# stop while mounted: refused, the device serves on, detached once unmounted.
in_sd systemctl stop --no-block fuse-blk@sdk
wait_until "stop refused" sh -c "[ \"\$(nsenter -t $sd -m -p systemctl show --value -p SubState fuse-blk@sdk)\" = stop-sigterm ]"
if in_sd "$FUSE_BLK" down sdk 2> $work/down.err; then fail "down while mounted"; fi
grep -q "in use\|mounted" $work/down.err || { cat $work/down.err; fail "down did not say why"; }
echo still-here > /tmp/mnt/after-stop && sync || fail "writing while stop waits"
[ -b "$dev" ] && [ -n "$(sd_listed sdk device)" ] || fail "detached while mounted"
umount /tmp/mnt
wait_until "stopped after the unmount" sh -c "[ \"\$(nsenter -t $sd -m -p systemctl show --value -p ActiveState fuse-blk@sdk)\" = inactive ]"
[ -z "$(sd_listed sdk device)" ] || fail "still attached after stop"
[ ! -b "$dev" ] || fail "$dev still exists"
e2fsck -fn $work/disk.img || fail "fsck"
no_io_errors

# Enabled, it comes back at the next boot.
in_sd systemctl enable fuse-blk@sdk || fail "enable"
power_off "the reboot"
boot_systemd
wait_until "sdk back after the reboot" sh -c "[ \"\$(nsenter -t $sd -m -p systemctl show --value -p ActiveState fuse-blk@sdk)\" = active ]"
dev=$(sd_listed sdk device)
mount "$dev" /tmp/mnt
[ "$(cat /tmp/mnt/after-stop)" = still-here ] || fail "data lost across the reboot"
umount /tmp/mnt
sd_job stop fuse-blk@sdk
[ -z "$(sd_listed sdk device)" ] || fail "still attached after the last stop"
no_io_errors

# /etc/fstab: the entry README.md shows, on the device's udev name (a
# udevd with the project's rules runs in the guest). The unit is disabled:
# the mount alone pulls it in, through x-systemd.requires.
udevd=/lib/systemd/systemd-udevd
[ -x "$udevd" ] && command -v udevadm >/dev/null ||
    skip_rest "systemd-udevd and udevadm (Debian's udev package) are not installed: no fstab part"
mkdir -p /run/udev/rules.d
cp "$CASES/../../../userspace/cli/udev/61-fuse-blk.rules" /run/udev/rules.d/
"$udevd" --daemon
udevd_running=1
in_sd systemctl disable fuse-blk@sdk || fail "disable"
power_off "before the fstab boot"
echo "/dev/fuseblk/sdk  /tmp/mnt  ext4  x-systemd.requires=fuse-blk@sdk.service  0 2" > $work/fstab
printf '[Unit]\nDescription=fuse-blk test\nWants=local-fs.target\nAfter=local-fs.target\n' \
    > $work/units/fuse-blk-test.target
boot_systemd
mounted() { [ "$(nsenter -t $sd -m -p findmnt -n -o TARGET /dev/fuseblk/sdk 2>/dev/null)" = /tmp/mnt ]; }
wait_until "the fstab entry mounted" mounted
[ "$(prop sdk ActiveState)" = active ] || fail "mounted, but fuse-blk@sdk is not active"
in_sd systemctl show -p After tmp-mnt.mount | grep -q "fuse-blk@sdk.service" ||
    fail "tmp-mnt.mount is not ordered after fuse-blk@sdk.service"
ready=$(prop sdk ActiveEnterTimestampMonotonic)
mount_started=$(in_sd systemctl show --value -p InactiveExitTimestampMonotonic tmp-mnt.mount)
[ "$mount_started" -ge "$ready" ] || fail "the mount started ($mount_started) before the device was ready ($ready)"
[ "$(in_sd cat /tmp/mnt/after-stop)" = still-here ] || fail "the fstab mount does not show the data"
in_sd sh -c 'echo fstab-boot > /tmp/mnt/fstab-boot && sync' || fail "writing through the fstab mount"
dev=$(sd_listed sdk device)
# Poweroff: the mount goes first, so the unit's stop detaches at once (were
# it still mounted, the stop would wait for ever).
power_off "the unit stopped before the unmount?"
[ ! -b "$dev" ] || fail "$dev still exists after the poweroff"
[ -z "$("$FUSE_BLK" list --json | grep -o '"sdk"')" ] || fail "sdk still listed after the poweroff"
udevadm settle -t 30
[ ! -e /dev/fuseblk/sdk ] || fail "/dev/fuseblk/sdk left after the poweroff"
e2fsck -fn $work/disk.img || fail "fsck after the fstab boot"
[ "$(debugfs -R "cat /fstab-boot" $work/disk.img 2>/dev/null)" = fstab-boot ] || fail "the write through the fstab mount is lost"
no_io_errors
