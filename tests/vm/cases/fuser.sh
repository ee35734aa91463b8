# A fuser::Filesystem served through the adapter on a module device.
. "$CASES/lib.bash"
"$VMTEST" fuser 128M > /tmp/fuser.out &
daemon=$!
for _ in $(seq 100); do [ -s /tmp/fuser.out ] && break; sleep 0.1; done
dev=$(cat /tmp/fuser.out)
[ -b "$dev" ] || fail "no device"
ext4_roundtrip "$dev" 16
"$VMTEST" destroy 0
wait "$daemon"
