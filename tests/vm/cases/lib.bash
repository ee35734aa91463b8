# Shared helpers of the VM cases (sourced).
fail() { echo "FAIL: $*" >&2; exit 1; }
attach() { "$FUSE_BLK" attach --transport kmod "$@"; }
detach() { "$FUSE_BLK" detach "$@"; }
# Random data file of $2 MiB with seed-independent content.
random_file() { head -c "$(( $2 << 20 ))" /dev/urandom > "$1"; }
sum() { sha256sum "$1" | cut -d' ' -f1; }
