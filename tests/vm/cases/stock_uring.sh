# The stock path (FUSE file + loop device) over FUSE-over-io_uring, on a
# guest kernel whose FUSE has it (6.14 and later, built with
# CONFIG_FUSE_IO_URING): the host suite's own test, tests/tests/
# stock_uring.rs, run here unchanged (tests/vm/run copies its binary).
. "$CASES/lib.bash"
[ -e /sys/module/fuse/parameters/enable_uring ] ||
    skip_rest "FUSE over io_uring: this kernel's FUSE has no enable_uring parameter"
test_bin=$(dirname "$FUSE_BLK")/stock_uring
[ -x "$test_bin" ] || fail "$test_bin missing (tests/vm/run copies it)"
FUSE_BLK_BIN=$FUSE_BLK "$test_bin" --test-threads=1 --nocapture
