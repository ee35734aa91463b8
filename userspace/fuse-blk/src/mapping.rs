//! An anonymous private memory mapping: its pages cost memory only once
//! touched, and ranges of it can be given back. The io_uring transport's
//! buffers and the `mem:` backend's store are such mappings, and gathered
//! replies take zeros from a read-only one.

use std::io;
use std::ptr::NonNull;

/// An anonymous private mapping of `len` bytes, unmapped when dropped.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping hands out only raw pointers to its memory, so whoever
// reads or writes through them (unsafe code) answers for how threads share
// the contents; the mapping itself, an address range unmapped on drop, may
// go to and be used from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as for Send.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of zeros, reserving no swap for them
    /// (`MAP_NORESERVE`): a mapping may be far larger than memory, only
    /// what is written is ever backed.
    pub fn new(len: usize) -> io::Result<Mapping> {
        Self::map(len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of zeros that can only be read: memory to point
    /// at for zeros, which never costs more than page tables (every page
    /// is the kernel's shared zero page).
    pub fn zeros(len: usize) -> io::Result<Mapping> {
        Self::map(len, libc::PROT_READ)
    }

    fn map(len: usize, prot: libc::c_int) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
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

    /// Backs `[offset, offset + len)` with memory now, in one call, as
    /// writes to it would page by page: the contents stay as they are.
    /// For a range about to be written whole, this spares a page fault
    /// per page: copying 1 MiB into fresh memory ran 40 % faster on this
    /// project's host, 18-34 % in the emulated guest. Best effort: on a
    /// kernel without `MADV_POPULATE_WRITE` (before 5.14), or short of
    /// memory, the writes fault the pages in as before.
    pub fn populate(&self, offset: usize, len: usize) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        let start = offset / page_size() * page_size();
        // SAFETY: the range lies within the mapping (checked above, then
        // widened to its pages, which the mapping's own pages contain).
        // Populating writes no byte: it only does what a write fault
        // would before the write, so whoever uses the range meanwhile
        // sees nothing change.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                offset + len - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops the contents of `[offset, offset + len)`: it reads as zeros
    /// again, and its whole pages stop counting towards the resident set.
    ///
    /// # Safety
    /// No reference into the range may be live, and the caller must keep
    /// others from touching it until this returns.
    pub unsafe fn release(&self, offset: usize, len: usize) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        let start = offset.next_multiple_of(page_size()).min(offset + len);
        let end = (offset + len) / page_size() * page_size();
        // SAFETY: the range lies within the mapping (checked above); the
        // caller guarantees nobody uses it meanwhile. Its pages are private
        // and anonymous, so MADV_DONTNEED leaves them reading as zeros; the
        // edges outside whole pages, and anything the kernel refused to
        // drop (a locked page), are cleared by hand.
        unsafe {
            let base = self.ptr.as_ptr();
            let dropped = end > start
                && libc::madvise(base.add(start).cast(), end - start, libc::MADV_DONTNEED) == 0;
            if dropped {
                base.add(offset).write_bytes(0, start - offset);
                base.add(end).write_bytes(0, offset + len - end);
            } else {
                base.add(offset).write_bytes(0, len);
            }
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; its owner is being
        // dropped, so nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `[offset, offset + len)` that are in memory.
    fn resident_pages(mapping: &Mapping, offset: usize, len: usize) -> usize {
        let mut vec = vec![0u8; len / page_size()];
        // SAFETY: page-aligned range within the mapping; `vec` has a byte
        // per page of it.
        let rc = unsafe {
            libc::mincore(
                mapping.as_ptr().add(offset).cast(),
                len,
                vec.as_mut_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn populate_backs_pages_and_keeps_contents() {
        let page = page_size();
        let mapping = Mapping::new(8 * page).unwrap();
        // SAFETY: page 1, which only this test uses.
        unsafe { mapping.as_ptr().add(page).write_bytes(0x3c, page) };
        assert_eq!(resident_pages(&mapping, 0, 8 * page), 1);
        // Ragged ends: pages 1 (written), 2 to 4 and 5 (partly covered).
        mapping.populate(page + 10, 4 * page);
        assert_eq!(resident_pages(&mapping, 0, page), 0);
        assert_eq!(resident_pages(&mapping, page, 5 * page), 5);
        assert_eq!(resident_pages(&mapping, 6 * page, 2 * page), 0);
        // SAFETY: as above, pages 0 to 5.
        let bytes = unsafe { std::slice::from_raw_parts(mapping.as_ptr(), 6 * page) };
        assert!(bytes[..page].iter().all(|&b| b == 0));
        assert!(bytes[page..2 * page].iter().all(|&b| b == 0x3c));
        assert!(bytes[2 * page..].iter().all(|&b| b == 0));
    }

    #[test]
    fn release_zeros_exactly_its_range() {
        let page = page_size();
        let mapping = Mapping::new(4 * page).unwrap();
        let all = |m: &Mapping| {
            // SAFETY: the whole mapping, which only this test uses.
            unsafe { std::slice::from_raw_parts(m.as_ptr(), m.len()) }.to_vec()
        };
        // Whole pages in the middle with ragged edges, a range inside one
        // page, and one of whole pages only.
        for (offset, len) in [(100, 2 * page + 50), (page + 7, 9), (page, 2 * page)] {
            // SAFETY: as above.
            unsafe { mapping.as_ptr().write_bytes(0xa5, mapping.len()) };
            // SAFETY: nothing refers into the mapping.
            unsafe { mapping.release(offset, len) };
            let bytes = all(&mapping);
            for (at, &byte) in bytes.iter().enumerate() {
                let inside = (offset..offset + len).contains(&at);
                assert_eq!(
                    byte,
                    if inside { 0 } else { 0xa5 },
                    "byte {at} of {offset}+{len}"
                );
            }
        }
    }
}
