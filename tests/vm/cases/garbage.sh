# A daemon writing garbage replies gets errors back, the kernel survives,
# and the device stays usable.
. "$CASES/lib.bash"
"$VMTEST" garbage | tee /tmp/garbage.out
grep -q "device usable after garbage" /tmp/garbage.out
[ "$(grep -c 'refused as expected' /tmp/garbage.out)" -ge 17 ] || fail "refusals"
