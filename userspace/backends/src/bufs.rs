//! The buffer of zeros the backends share, for answering reads of nothing
//! and for writing zeros where a file system can neither punch nor zero a
//! range.

use std::sync::LazyLock;

/// Length of [`zeros`]: the engine's default largest request, so a read is
/// usually answered from one slice of it.
pub const ZEROS_LEN: usize = 1 << 20;

/// Allocated on first use rather than a `static [u8; N]`: a constant of
/// zeros would sit in the binary's read-only data, while a zeroed heap
/// allocation is backed by the kernel's shared zero page until written,
/// which it never is.
static ZEROS: LazyLock<Box<[u8]>> = LazyLock::new(|| vec![0u8; ZEROS_LEN].into_boxed_slice());

/// [`ZEROS_LEN`] bytes of zeros.
pub fn zeros() -> &'static [u8] {
    &ZEROS
}
