# A daemon misusing io_uring commands gets errors back, rings that go away
# at any stage leave nothing stuck, and the device stays usable.
. "$CASES/lib.bash"
module_offers uring || skip_rest "io_uring channels: the module does not offer them"
"$VMTEST" ring-garbage | tee /tmp/ring-garbage.out
grep -q "device usable after bad commands" /tmp/ring-garbage.out || fail "bad commands"
grep -q "READ data taken from the address a commit names" /tmp/ring-garbage.out || fail "data address"
grep -q "ring entries freed when their ring goes away" /tmp/ring-garbage.out || fail "cancel"
grep -q "channel usable after its ring went away" /tmp/ring-garbage.out || fail "ring gone"
grep -q "request held in a ring entry reissued" /tmp/ring-garbage.out || fail "reissue"
grep -q "waiting entries end with ENODEV" /tmp/ring-garbage.out || fail "destroy"
[ "$(grep -c 'refused as expected' /tmp/ring-garbage.out)" -ge 19 ] || fail "refusals"
