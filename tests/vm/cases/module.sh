# The module cannot be unloaded while a device exists; the control device
# refuses bad parameters.
. "$CASES/lib.bash"
dev=$(attach --name pinned mem:8M)
if rmmod fuse_blk 2>/dev/null; then fail "rmmod succeeded with a device"; fi
[ -b "$dev" ] || fail "device gone"
detach pinned
"$VMTEST" info 0 2>/dev/null && fail "info of a destroyed device"
true
