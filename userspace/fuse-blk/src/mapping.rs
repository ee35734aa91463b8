//! An anonymous private memory mapping: its pages cost memory only once
//! touched, and ranges of it can be given back. The io_uring transport's
//! buffers and the `mem:` backend's store are such mappings.

use std::io;
use std::ptr::NonNull;

pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of zeros, reserving no swap for them
    /// (`MAP_NORESERVE`): a mapping may be far larger than memory, only
    /// what is written is ever backed.
    pub fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned a null mapping"),
            len,
        })
    }

    /// Asks for base pages only: a transparent huge page would make the
    /// first write of a few bytes cost 2 MiB.
    pub fn without_huge_pages(self) -> Mapping {
        // SAFETY: advice on this mapping only; it changes no contents.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_NOHUGEPAGE);
        }
        self
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops the contents of the whole pages in `[offset, offset + len)`:
    /// they read as zeros again and stop counting towards the resident
    /// set.
    ///
    /// # Safety
    /// No reference into the range may be live, and the caller must keep
    /// others from touching it until this returns.
    pub unsafe fn release(&self, offset: usize, len: usize) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: the range lies within the mapping (checked above); the
        // caller guarantees nobody uses it meanwhile.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(offset).cast(),
                len,
                libc::MADV_DONTNEED,
            );
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; its owner is being
        // dropped, so nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
