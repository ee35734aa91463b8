# /dev/fuse-blk is misc minor 246 with a "devname:" alias: with the node
# made at boot (kmod static-nodes) and the module installed, the first open
# loads the module, as for /dev/fuse and /dev/loop-control.
. "$CASES/lib.bash"
[ "$(stat -c %t:%T /dev/fuse-blk)" = a:f6 ] ||
    fail "/dev/fuse-blk is $(stat -c %t:%T /dev/fuse-blk), not char 10:246 (0xa:0xf6)"
aliases=$(modinfo -F alias "$FUSE_BLK_KO")
echo "$aliases" | grep -qx "devname:fuse-blk" || fail "no devname alias: $aliases"
echo "$aliases" | grep -qx "char-major-10-246" || fail "no char-major alias: $aliases"
command -v depmod > /dev/null || skip_rest "depmod (kmod) is not installed"

# Install the module under a private root and have the kernel's modprobe
# look there: /lib/modules of the guest is the host's, read-only.
root=/tmp/modroot
kver=$(uname -r)
mkdir -p "$root/lib/modules/$kver/extra"
cp "$FUSE_BLK_KO" "$root/lib/modules/$kver/extra/"
depmod -b "$root" "$kver" 2>/dev/null
grep -q "^fuse_blk fuse-blk c10:246" "$root/lib/modules/$kver/modules.devname" ||
    fail "modules.devname: $(cat "$root/lib/modules/$kver/modules.devname")"
cat > /tmp/modprobe-wrapper <<WRAP
#!/bin/sh
exec $(command -v modprobe) -d $root "\$@"
WRAP
chmod +x /tmp/modprobe-wrapper
old_helper=$(cat /proc/sys/kernel/modprobe)
restore() {
    echo "$old_helper" > /proc/sys/kernel/modprobe
    # The suite's later cases and its end expect the module loaded.
    lsmod | grep -q "^fuse_blk " || insmod "$FUSE_BLK_KO"
}
trap restore EXIT
echo /tmp/modprobe-wrapper > /proc/sys/kernel/modprobe

rmmod fuse_blk || fail "rmmod"
[ ! -e /dev/fuse-blk ] || fail "/dev/fuse-blk outlived the module"
# What kmod static-nodes makes at boot from modules.devname.
mknod -m 600 /dev/fuse-blk c 10 246
"$VMTEST" features > /tmp/features || fail "opening /dev/fuse-blk did not load the module"
lsmod | grep -q "^fuse_blk " || fail "the module is not loaded after the open"
dev=$(attach --name auto mem:8M)
[ -b "$dev" ] || fail "no device after the autoload"
detach auto
