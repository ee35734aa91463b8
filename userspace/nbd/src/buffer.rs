//! A command's data buffer, and the spare ones a link keeps for reuse.
//!
//! Buffers are anonymous mappings of their own, not the allocator's
//! memory, so that dropping one gives its pages back to the system at
//! once. Through malloc they stayed resident after the I/O: they were
//! allocated on the handler threads (a queue's worker and helpers, the
//! stock path's workers), each thread with a glibc arena of its own, and
//! `malloc_trim` gives back the free chunks inside an arena but not the
//! free memory at the top of a thread's arena. That top is kept up to the
//! trim threshold: 128 KiB plus 128 KiB of padding for 4 KiB requests,
//! 2 MiB once a freed 1 MiB buffer has raised the threshold. An idle
//! `nbd:` daemon kept 1-4 MiB more after I/O than before it (see
//! Documentation/DESIGN.md, the `nbd:` backend's memory).
//!
//! Sizes are rounded up to a power of two, at least a page, so that
//! buffers are reused across requests of nearby sizes; a mapping costs
//! memory only for the pages touched.

use std::io;

use fuse_blk::mapping::Mapping;

/// The smallest buffer: one page.
const SMALLEST: usize = 4096;

/// Size classes: 4 KiB, 8 KiB, ... up to 2^(12 + CLASSES - 1) (larger
/// buffers are not kept).
const CLASSES: usize = 14;

/// Spare buffers of one class kept at most, and their bytes at most:
/// 256 of 4 KiB (one link's commands in flight, twice), 32 of 1 MiB.
const SPARE_COUNT: usize = 256;
const SPARE_BYTES: usize = 32 << 20;

/// The data of a read or write: room for `capacity` bytes, every one of
/// which reads as what was last written there, or zero.
pub struct Buffer {
    /// None for a job without data.
    mapping: Option<Mapping>,
}

impl Buffer {
    /// A buffer that holds nothing, for a job without data; maps nothing.
    pub fn empty() -> Buffer {
        Buffer { mapping: None }
    }

    /// A fresh buffer with room for `len` bytes (a whole size class),
    /// whose pages are backed now, in one call, rather than by a fault on
    /// each page as the data arrives.
    pub fn with_capacity(len: usize) -> io::Result<Buffer> {
        if len == 0 {
            return Ok(Buffer::empty());
        }
        let capacity = class_size(len);
        let mapping = Mapping::new(capacity)?.without_huge_pages();
        mapping.populate(0, len);
        Ok(Buffer {
            mapping: Some(mapping),
        })
    }

    /// Bytes it can hold.
    pub fn capacity(&self) -> usize {
        self.mapping.as_ref().map_or(0, Mapping::len)
    }

    /// Copies `data` to its start. Panics if it does not fit.
    pub fn fill_from(&mut self, data: &[u8]) {
        assert!(data.len() <= self.capacity(), "data larger than its buffer");
        if data.is_empty() {
            return;
        }
        // SAFETY: the buffer has room for `data` (checked above) and is
        // this one's alone (`&mut self`), so no other reference into it
        // is live; `data` is not in it, since nothing borrows it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_mut_ptr(), data.len()) };
    }

    /// Its first byte, for libnbd to read a write's data from or write a
    /// read's into; dangling (never dereferenced) for an empty buffer.
    /// The bytes stay where they are until the buffer is dropped.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.mapping
            .as_ref()
            .map_or(std::ptr::NonNull::dangling().as_ptr(), Mapping::as_ptr)
    }

    /// The first `len` bytes.
    ///
    /// # Safety
    /// Nothing (libnbd) may write them while the slice lives.
    pub unsafe fn bytes(&self, len: usize) -> &[u8] {
        assert!(len <= self.capacity(), "more than the buffer holds");
        match &self.mapping {
            // SAFETY: within the mapping (checked above), whose bytes are
            // always initialised (zeros until written); the caller
            // guarantees nobody writes them meanwhile.
            Some(mapping) => unsafe { std::slice::from_raw_parts(mapping.as_ptr(), len) },
            None => &[],
        }
    }
}

/// The capacity of the class `len` falls in.
fn class_size(len: usize) -> usize {
    len.next_power_of_two().max(SMALLEST)
}

/// The index of the class whose size is `capacity`, if buffers of it are
/// kept.
fn class_index(capacity: usize) -> Option<usize> {
    let index =
        (capacity.trailing_zeros() as usize).checked_sub(SMALLEST.trailing_zeros() as usize)?;
    (capacity.is_power_of_two() && index < CLASSES).then_some(index)
}

/// Buffers of answered commands, by size class, for the next ones: a
/// fresh one costs a mapping and its page faults.
#[derive(Default)]
pub struct Spare {
    classes: [Vec<Buffer>; CLASSES],
}

impl Spare {
    /// A spare buffer with room for `len` bytes, if there is one.
    pub fn take(&mut self, len: usize) -> Option<Buffer> {
        self.classes[class_index(class_size(len))?].pop()
    }

    /// Keeps `buffer` for another command, if its class has room.
    pub fn put(&mut self, buffer: Buffer) {
        let capacity = buffer.capacity();
        let Some(index) = class_index(capacity) else {
            return;
        };
        let class = &mut self.classes[index];
        if class.len() < SPARE_COUNT && (class.len() + 1) * capacity <= SPARE_BYTES {
            class.push(buffer);
        }
    }

    /// Whether no buffer is kept.
    pub fn is_empty(&self) -> bool {
        self.classes.iter().all(Vec::is_empty)
    }

    /// Drops every buffer kept: their memory goes back at once.
    pub fn clear(&mut self) {
        self.classes.iter_mut().for_each(Vec::clear);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_a_class() {
        assert_eq!(Buffer::with_capacity(0).unwrap().capacity(), 0);
        assert_eq!(Buffer::with_capacity(512).unwrap().capacity(), 4096);
        assert_eq!(Buffer::with_capacity(4096).unwrap().capacity(), 4096);
        assert_eq!(Buffer::with_capacity(4097).unwrap().capacity(), 8192);
        assert_eq!(Buffer::with_capacity(1 << 20).unwrap().capacity(), 1 << 20);
        assert_eq!(class_index(4096), Some(0));
        assert_eq!(class_index(1 << 20), Some(8));
        assert_eq!(class_index(32 << 20), Some(13));
        assert_eq!(class_index(64 << 20), None);
        assert_eq!(class_index(0), None);
    }

    #[test]
    fn filled_data_reads_back() {
        for len in [512, 64 << 10, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut buffer = Buffer::with_capacity(len).unwrap();
            buffer.fill_from(&data);
            // SAFETY: nothing writes the buffer meanwhile.
            assert_eq!(unsafe { buffer.bytes(len) }, &data[..]);
            let ptr = buffer.as_mut_ptr();
            // SAFETY: `len` bytes of the buffer, which no reference
            // covers.
            unsafe { ptr.write_bytes(0xa5, len) };
            // SAFETY: as above.
            assert!(unsafe { buffer.bytes(len) }.iter().all(|&b| b == 0xa5));
        }
    }

    #[test]
    fn spare_buffers_are_reused_by_class_up_to_a_bound() {
        let mut spare = Spare::default();
        assert!(spare.take(4096).is_none());
        let mut buffer = Buffer::with_capacity(3000).unwrap();
        let address = buffer.as_mut_ptr();
        spare.put(buffer);
        assert!(!spare.is_empty());
        assert!(spare.take(8192).is_none(), "a buffer of another class");
        let mut again = spare.take(4000).expect("the spare buffer");
        assert_eq!(again.as_mut_ptr(), address);
        assert!(spare.is_empty());

        for _ in 0..40 {
            spare.put(Buffer::with_capacity(1 << 20).unwrap());
        }
        let kept = std::iter::from_fn(|| spare.take(1 << 20)).count();
        assert_eq!(kept, SPARE_BYTES / (1 << 20));
        spare.put(Buffer::with_capacity(64 << 20).unwrap());
        spare.put(Buffer::empty());
        assert!(spare.is_empty(), "too large or empty buffers are not kept");
        spare.put(again);
        spare.clear();
        assert!(spare.is_empty());
    }
}
