//! A RAM disk: sparse, so a device far larger than memory costs only what
//! has been written to it.

use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuse_blk::mapping::Mapping;
use fuse_blk::{
    BlockDevice, Extent, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request,
};
use parking_lot::lock_api::RawRwLock as _;
use parking_lot::RawRwLock;

/// The store is one mapping of the whole device, and memory is taken for
/// it in chunks of this size: one page, so that a small random write costs
/// a page of fresh memory, not more (with 64 KiB chunks, 4 KiB random
/// writes to a fresh device ran at half the rate in the guest, and
/// scattered small writes, file system metadata, pinned 16 times the
/// memory). A bit per chunk says whether it was ever written: unwritten
/// ones read as zeros without touching the mapping. One mapping rather
/// than a chunk apiece lets a request's data move in one copy: with a
/// copy per 4 KiB chunk, 1 MiB reads spent most of their time on the
/// fixed cost of each `memcpy` call under emulation. Every supported
/// block size divides a chunk, so no block spans two chunks.
pub const CHUNK_SIZE: u64 = 4096;

/// Chunks are locked in groups of this many (64 KiB): a request takes the
/// locks of the groups it touches, so a block is never seen half written
/// and a request takes a few locks rather than one per chunk.
const CHUNKS_PER_GROUP: u64 = 16;

/// Groups share this many locks, group `g` taking lock `g % LOCKS`, so
/// that requests to different places rarely contend.
const LOCKS: usize = 256;

/// Address space a device reserves to grow into (online resize): 256 GiB,
/// which costs nothing until written.
const GROWTH_ROOM: u64 = 256 << 30;

/// A sparse in-memory block device. Never-written chunks read as zeros;
/// discards and zeroed ranges give whole chunks back to the kernel.
/// Nothing survives the process, so there is no cache to flush and FUA is
/// meaningless: the device advertises neither.
pub struct MemDevice {
    /// Bytes the device has now (see `resize`); at most `capacity`.
    size: AtomicU64,
    /// Bytes the store and the chunk map have room for.
    capacity: u64,
    logical_block_size: u32,
    read_only: bool,
    /// The device's bytes, `size` long; a chunk is backed by memory from
    /// its first write. Unwritten chunks hold zeros (never touched, or
    /// given back with [`Mapping::release`]), so a first write into part
    /// of one leaves the rest reading as zeros. Reads are answered from
    /// the written chunks of the store and never touch an unwritten one:
    /// reading it would map the zero page there, which its first write
    /// then has to replace, one page at a time, each at the cost of a TLB
    /// flush on every CPU running the daemon (first writes of 1 MiB ran at
    /// a fifth of their rate in the guest). Shared with the replies until
    /// the kernel has read them.
    store: Arc<Mapping>,
    /// Chunks that hold data.
    written: ChunkBits,
    locks: Box<[RawRwLock]>,
}

/// One bit per chunk: `AtomicU64` words in a mapping of zeros, so a large
/// device's map costs nothing until used. A bit changes only under its
/// chunk's lock, which a reader holds unless it merely peeks (`read`).
struct ChunkBits {
    words: Mapping,
}

impl ChunkBits {
    fn new(chunks: u64) -> io::Result<ChunkBits> {
        let words = usize::try_from(chunks.div_ceil(64))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many chunks"))?;
        Ok(ChunkBits {
            words: Mapping::new(words.max(1) * std::mem::size_of::<AtomicU64>())?,
        })
    }

    /// The word that holds chunk `chunk`'s bit, and that bit.
    fn word(&self, chunk: u64) -> (&AtomicU64, u64) {
        let index = (chunk / 64) as usize;
        assert!(index * 8 < self.words.len());
        // SAFETY: the index lies within the map (checked above), which is
        // page-aligned, zero-initialised memory: valid `AtomicU64`s, only
        // ever accessed atomically.
        let word = unsafe { &*self.words.as_ptr().cast::<AtomicU64>().add(index) };
        (word, 1 << (chunk % 64))
    }

    fn get(&self, chunk: u64) -> bool {
        let (word, bit) = self.word(chunk);
        word.load(Ordering::Relaxed) & bit != 0
    }

    fn set(&self, chunk: u64, value: bool) {
        let (word, bit) = self.word(chunk);
        // Most calls find the bit as wanted already (a rewrite): a load
        // spares them the atomic read-modify-write of a word other
        // threads' chunks share.
        if (word.load(Ordering::Relaxed) & bit != 0) == value {
            return;
        }
        if value {
            word.fetch_or(bit, Ordering::Relaxed);
        } else {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Bits set among chunks `0..chunks`.
    fn count(&self, chunks: u64) -> u64 {
        (0..chunks.div_ceil(64))
            .map(|word| u64::from(self.word(word * 64).0.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

// Threads share the mappings through the methods below: a chunk's bytes
// under its group's lock (shared to read, exclusive to write), the
// bitmap's words atomically.

/// One chunk's share of a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    chunk: u64,
    /// Offset inside the chunk.
    start: usize,
    len: usize,
}

/// Splits `[offset, offset + len)` along chunk boundaries.
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let chunk = pos / CHUNK_SIZE;
        let start = pos % CHUNK_SIZE;
        let n = (CHUNK_SIZE - start).min(end - pos);
        pos += n;
        Some(Piece {
            chunk,
            start: start as usize,
            len: n as usize,
        })
    })
}

/// Splits `[offset, offset + len)` into runs of consecutive pieces on which
/// `kind` gives the same answer: `(offset, len, kind)` each, in order.
fn runs(
    offset: u64,
    len: u64,
    mut kind: impl FnMut(&Piece) -> bool,
) -> impl Iterator<Item = (u64, u64, bool)> {
    let mut pieces = pieces(offset, len).peekable();
    std::iter::from_fn(move || {
        let first = pieces.next()?;
        let first_kind = kind(&first);
        let start = first.chunk * CHUNK_SIZE + first.start as u64;
        let mut run_len = first.len as u64;
        while let Some(next) = pieces.peek() {
            if kind(next) != first_kind {
                break;
            }
            run_len += next.len as u64;
            pieces.next();
        }
        Some((start, run_len, first_kind))
    })
}

/// The locks a request on `[offset, offset + len)` takes, as two ranges of
/// lock indexes in ascending order (the second empty unless the groups
/// wrap around the locks): taken in that order, two requests never wait
/// for each other in a circle.
fn lock_ranges(offset: u64, len: u64) -> [Range<usize>; 2] {
    if len == 0 {
        return [0..0, 0..0];
    }
    let group_of = |byte: u64| byte / CHUNK_SIZE / CHUNKS_PER_GROUP;
    let (first, last) = (group_of(offset), group_of(offset + len - 1));
    if last - first + 1 >= LOCKS as u64 {
        return [0..LOCKS, 0..0];
    }
    let (a, b) = (
        (first % LOCKS as u64) as usize,
        (last % LOCKS as u64) as usize,
    );
    if a <= b {
        [a..b + 1, 0..0]
    } else {
        [0..b + 1, a..LOCKS]
    }
}

/// The group locks of a request, held until dropped (no allocation: a
/// 4 KiB request takes one lock, a 1 MiB one 16 or 17).
struct GroupLocks<'a> {
    locks: &'a [RawRwLock],
    ranges: [Range<usize>; 2],
    exclusive: bool,
}

impl Drop for GroupLocks<'_> {
    fn drop(&mut self) {
        for i in self.ranges.iter().cloned().flatten() {
            // SAFETY: `MemDevice::lock` took exactly these locks in this
            // mode for this guard, and nothing else releases them.
            unsafe {
                if self.exclusive {
                    self.locks[i].unlock_exclusive();
                } else {
                    self.locks[i].unlock_shared();
                }
            }
        }
    }
}

impl MemDevice {
    /// A writable, all-zero device of `size` bytes. Nothing is allocated
    /// until written (the store only reserves address space); the geometry
    /// is checked by the session (or by `BackendSpec::open`), not here.
    pub fn new(size: u64, logical_block_size: u32) -> io::Result<MemDevice> {
        let too_large = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("mem: {size} bytes do not fit in this process's address space"),
            )
        };
        let len = usize::try_from(size).map_err(|_| too_large())?;
        // Room to grow into (online resize) costs address space only;
        // where even that is counted (strict overcommit) the device gets
        // just its own size.
        let room = usize::try_from(GROWTH_ROOM).unwrap_or(len).max(len);
        let (store, capacity) = match Mapping::new(room.max(1)) {
            Ok(store) => (store, room),
            Err(_) => (
                Mapping::new(len.max(1)).map_err(|e| {
                    // Only strict overcommit (vm.overcommit_memory=2)
                    // counts address space that is merely reserved.
                    io::Error::new(
                        e.kind(),
                        format!("mem: reserving {size} bytes of address space: {e}"),
                    )
                })?,
                len,
            ),
        };
        let capacity = capacity as u64;
        Ok(MemDevice {
            size: AtomicU64::new(size),
            capacity,
            logical_block_size,
            read_only: false,
            store: Arc::new(store.without_huge_pages()),
            written: ChunkBits::new(capacity.div_ceil(CHUNK_SIZE)).map_err(|_| too_large())?,
            locks: (0..LOCKS).map(|_| RawRwLock::INIT).collect(),
        })
    }

    /// The device's size in bytes now.
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Marks the device read-only in its geometry (it then reads as zeros
    /// forever, which is still useful to test a consumer's read path).
    pub fn with_read_only(mut self, read_only: bool) -> MemDevice {
        self.read_only = read_only;
        self
    }

    /// Bytes of chunks currently holding data.
    pub fn allocated_bytes(&self) -> u64 {
        let chunks = self.size().div_ceil(CHUNK_SIZE);
        let whole = self.written.count(chunks);
        // Every chunk counted whole; the last may be shorter.
        let last = chunks - 1;
        let short = CHUNK_SIZE - self.chunk_len(last) as u64;
        whole * CHUNK_SIZE - if self.is_written(last) { short } else { 0 }
    }

    /// Length of chunk `chunk`: the last one stops at the end of the device.
    fn chunk_len(&self, chunk: u64) -> usize {
        (self.size() - chunk * CHUNK_SIZE).min(CHUNK_SIZE) as usize
    }

    /// Whether `[offset, offset + len)` lies within the device. The engine
    /// guarantees it; checked anyway because a wrong range would otherwise
    /// reach outside the store.
    fn in_bounds(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size())
    }

    /// Whether chunk `chunk` holds data.
    fn is_written(&self, chunk: u64) -> bool {
        self.written.get(chunk)
    }

    /// Gives back the memory of whole chunks `[first, last]`, which hold
    /// no data and which the caller has write-locked: they read as zeros
    /// still, and map nothing.
    fn release_chunks(&self, first: u64, last: u64) {
        let start = first * CHUNK_SIZE;
        let end = last * CHUNK_SIZE + self.chunk_len(last) as u64;
        // SAFETY: within the device; its groups are write-locked, so
        // nobody holds a slice of it.
        unsafe { self.store.release(start as usize, (end - start) as usize) };
    }

    /// Takes the locks of the groups of `[offset, offset + len)`: shared
    /// to read, `exclusive` to write.
    fn lock(&self, offset: u64, len: u64, exclusive: bool) -> GroupLocks<'_> {
        let ranges = lock_ranges(offset, len);
        for i in ranges.iter().cloned().flatten() {
            if exclusive {
                self.locks[i].lock_exclusive();
            } else {
                self.locks[i].lock_shared();
            }
        }
        GroupLocks {
            locks: &self.locks,
            ranges,
            exclusive,
        }
    }

    /// The store's bytes `[offset, offset + len)`, to write.
    ///
    /// # Safety
    /// The range lies within the device, and the caller holds the locks of
    /// its groups (`lock`) exclusively while it uses the slice: nobody else
    /// uses the range.
    #[allow(clippy::mut_from_ref)]
    unsafe fn stored_mut(&self, offset: u64, len: u64) -> &mut [u8] {
        // SAFETY: in bounds; the caller has the range to itself.
        unsafe {
            std::slice::from_raw_parts_mut(self.store.as_ptr().add(offset as usize), len as usize)
        }
    }

    fn write_from(&self, offset: u64, data: &[u8]) {
        let _locks = self.lock(offset, data.len() as u64, true);
        let piece_data = |p: &Piece| {
            let at = (p.chunk * CHUNK_SIZE + p.start as u64 - offset) as usize;
            &data[at..at + p.len]
        };
        // Zeros written to a hole leave it a hole: mkfs and the like zero
        // whole devices, which would otherwise take memory for all of it.
        let stores = |p: &Piece| self.is_written(p.chunk) || piece_data(p).iter().any(|&b| b != 0);
        for (start, len, store) in runs(offset, data.len() as u64, stores) {
            if !store {
                continue;
            }
            // A chunk's first data needs no clearing around it: an
            // unwritten chunk holds zeros (see `store`). Its memory comes
            // from the kernel, which for more than a chunk costs less
            // asked for at once than faulted in page by page (fresh
            // 1 MiB writes on the stock path, host: +18 % and +32 % in
            // two series of A/B runs; in the guest within noise, where
            // the kernel's clearing of each page dominates).
            for (fresh_start, fresh_len, fresh) in runs(start, len, |p| !self.is_written(p.chunk)) {
                if fresh && fresh_len > CHUNK_SIZE {
                    self.store
                        .populate(fresh_start as usize, fresh_len as usize);
                }
            }
            for piece in pieces(start, len) {
                self.written.set(piece.chunk, true);
            }
            // SAFETY: within the device; its groups are write-locked.
            unsafe { self.stored_mut(start, len) }
                .copy_from_slice(&data[(start - offset) as usize..][..len as usize]);
        }
    }

    /// Zeros a range: chunks it covers whole are given back to the kernel,
    /// the partial ones at its edges are cleared in place.
    fn zero_range(&self, offset: u64, len: u64) {
        let _locks = self.lock(offset, len, true);
        let whole = |p: &Piece| p.start == 0 && p.len == self.chunk_len(p.chunk);
        for (start, len, whole) in runs(offset, len, whole) {
            if whole {
                for piece in pieces(start, len) {
                    self.written.set(piece.chunk, false);
                }
                self.release_chunks(start / CHUNK_SIZE, (start + len - 1) / CHUNK_SIZE);
            } else {
                for piece in pieces(start, len).filter(|p| self.is_written(p.chunk)) {
                    let at = piece.chunk * CHUNK_SIZE + piece.start as u64;
                    // SAFETY: within the device; its groups are
                    // write-locked.
                    unsafe { self.stored_mut(at, piece.len as u64) }.fill(0);
                }
            }
        }
    }
}

impl BlockDevice for MemDevice {
    /// Writes, which may take fresh (cleared) memory, gain from helper
    /// threads; a read is one copy from memory, and handing it over cost
    /// more than it overlapped (measured in the guest: writes +25 %, reads
    /// down to -40 % for 1 MiB requests).
    fn parallel_large_io(&self, write: bool) -> bool {
        write
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            read_only: self.read_only,
            features: Features {
                flush: false,
                fua: false,
                discard: true,
                write_zeroes: true,
            },
            ..Geometry::new(self.size(), self.logical_block_size)
        }
    }

    /// Grows into the address space reserved at creation (`GROWTH_ROOM`),
    /// or shrinks, giving back the memory past the new end: a later grow
    /// reads zeros there.
    fn resize(&self, size: u64) -> io::Result<()> {
        if size > self.capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "mem: cannot grow beyond {} bytes, the address space reserved when it was made",
                    self.capacity
                ),
            ));
        }
        let old = self.size();
        if size < old {
            self.zero_range(size, old - size);
        }
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn read(&self, _req: &Request, offset: u64, len: u32, reply: ReplyData) {
        if !self.in_bounds(offset, u64::from(len)) {
            return reply.error(libc::EINVAL);
        }
        let len = u64::from(len);
        // Never written: zeros, which the transport may send without data.
        // (A write racing with this check is simply ordered after it.)
        if pieces(offset, len).all(|p| !self.is_written(p.chunk)) {
            return reply.zeros();
        }
        let _locks = self.lock(offset, len, false);
        // Answered from the store in place, the unwritten chunks as zeros
        // (see `store`): the kernel copies it into the request's pages (on
        // the module's io_uring channels, after the locks are dropped),
        // one copy in all.
        let mut extents =
            runs(offset, len, |p| self.is_written(p.chunk)).map(|(start, len, written)| {
                match written {
                    true => Extent::Mapped {
                        offset: start as usize,
                        len: len as usize,
                    },
                    false => Extent::Zeros { len: len as usize },
                }
            });
        // (Not empty: an empty range has nothing written, answered above.)
        let first = extents.next().expect("a read of at least one block");
        // One run (all written, the common case) needs no allocation.
        // SAFETY: no writer holds these groups while the reply is made;
        // afterwards the written ranges only ever hold these blocks' data
        // (writes and discards of them racing with this read), for as long
        // as the store lives, which the reply keeps alive.
        unsafe {
            match extents.next() {
                None => reply.gathered(&self.store, &[first]),
                Some(second) => {
                    let all: Vec<Extent> = [first, second].into_iter().chain(extents).collect();
                    reply.gathered(&self.store, &all);
                }
            }
        }
    }

    fn write(&self, _req: &Request, offset: u64, data: &[u8], _fua: bool, reply: ReplyWrite) {
        if !self.in_bounds(offset, data.len() as u64) {
            return reply.error(libc::ENOSPC);
        }
        self.write_from(offset, data);
        reply.ok();
    }

    /// Discarded ranges read as zeros afterwards, which a discard allows and
    /// which frees the memory.
    fn discard(&self, _req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        if !self.in_bounds(offset, len) {
            return reply.error(libc::EINVAL);
        }
        self.zero_range(offset, len);
        reply.ok();
    }

    /// `may_unmap` makes no difference: a freed chunk reads as zeros, and
    /// keeping zeroed memory allocated would buy nothing.
    fn write_zeroes(
        &self,
        _req: &Request,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        if !self.in_bounds(offset, len) {
            return reply.error(libc::EINVAL);
        }
        self.zero_range(offset, len);
        reply.ok();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testutil::{pattern, Harness};

    const C: u64 = CHUNK_SIZE;

    fn setup(size: u64, block: u32) -> (Arc<MemDevice>, Harness) {
        let device = Arc::new(MemDevice::new(size, block).unwrap());
        let harness = Harness::new(device.clone());
        (device, harness)
    }

    #[test]
    fn grows_and_shrinks_and_what_was_cut_off_reads_as_zeros() {
        // 512-byte blocks: the end can fall inside a chunk.
        let (device, h) = setup(C + 512, 512);
        h.write(C, &[7; 512], false).unwrap();
        h.resize(4 * C).unwrap();
        assert_eq!(h.geometry().size, 4 * C);
        assert_eq!(h.read(C, 512).unwrap(), vec![7; 512], "kept what it had");
        assert_eq!(h.read(C + 512, 512).unwrap(), vec![0; 512]);
        h.write(3 * C, &[9; 4096], false).unwrap();

        h.resize(C + 512).unwrap();
        assert_eq!(h.write(3 * C, &[1; 512], false), Err(libc::ENOSPC));
        assert_eq!(device.allocated_bytes(), 512, "the cut-off chunk went back");
        h.resize(4 * C).unwrap();
        assert_eq!(h.read(3 * C, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(h.read(C, 512).unwrap(), vec![7; 512]);
    }

    #[test]
    fn refuses_to_grow_past_its_reserved_room_or_to_a_bad_size() {
        let (_device, h) = setup(1 << 20, 4096);
        let past = GROWTH_ROOM + (1 << 20);
        let e = h.resize(past).unwrap_err();
        assert!(e.to_string().contains("cannot grow beyond"), "{e}");
        assert_eq!(h.geometry().size, 1 << 20, "nothing changed");
        assert!(h.resize(0).is_err());
        assert!(h.resize((1 << 20) + 512).is_err(), "not a multiple of 4096");
        assert_eq!(h.geometry().size, 1 << 20);
    }

    #[test]
    fn pieces_split_on_chunk_boundaries() {
        let p: Vec<_> = pieces(C - 512, C + 1024).collect();
        assert_eq!(
            p,
            vec![
                Piece {
                    chunk: 0,
                    start: (C - 512) as usize,
                    len: 512
                },
                Piece {
                    chunk: 1,
                    start: 0,
                    len: C as usize
                },
                Piece {
                    chunk: 2,
                    start: 0,
                    len: 512
                },
            ]
        );
        assert_eq!(pieces(5 * C, 0).count(), 0);
    }

    #[test]
    fn geometry_and_features() {
        let (_, h) = setup(1 << 30, 4096);
        let g = h.geometry();
        assert_eq!(g.size, 1 << 30);
        assert_eq!(g.logical_block_size, 4096);
        assert!(!g.read_only);
        assert_eq!(
            g.features,
            Features {
                flush: false,
                fua: false,
                discard: true,
                write_zeroes: true
            }
        );
    }

    #[test]
    fn unwritten_device_reads_zeros_and_allocates_nothing() {
        let (dev, h) = setup(1 << 40, 4096);
        assert_eq!(h.read(0, 1 << 20).unwrap(), vec![0; 1 << 20]);
        assert_eq!(h.read((1 << 40) - 4096, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(dev.allocated_bytes(), 0);
    }

    #[test]
    fn round_trips_at_various_offsets() {
        let (dev, h) = setup(16 * C, 512);
        let cases: &[(u64, usize)] = &[
            (0, 512),
            (C + 512, 1024),                      // inside a chunk
            (2 * C - 512, 1024),                  // straddles a chunk boundary
            (4 * C - 512, 2 * C as usize + 1024), // spans a whole chunk
            (8 * C, C as usize),                  // exactly one chunk
            (16 * C - 512, 512),                  // the last block
        ];
        for (i, &(offset, len)) in cases.iter().enumerate() {
            let data = pattern(i as u64, len);
            h.write(offset, &data, false).unwrap();
            assert_eq!(
                h.read(offset, len as u32).unwrap(),
                data,
                "case {i} at {offset}"
            );
        }
        // Every case still reads back after all were written (none
        // overlaps another).
        for (i, &(offset, len)) in cases.iter().enumerate() {
            assert_eq!(
                h.read(offset, len as u32).unwrap(),
                pattern(i as u64, len),
                "case {i}"
            );
        }
        // Neighbours of written ranges are untouched.
        assert_eq!(h.read(C - 1024, 512).unwrap(), vec![0; 512]);
        assert_eq!(h.read(C + 2048, 512).unwrap(), vec![0; 512]);
        assert!(dev.allocated_bytes() <= 16 * C);
    }

    #[test]
    fn reads_mix_written_and_unwritten_chunks() {
        let (_, h) = setup(8 * C, 4096);
        let data = pattern(7, 4096);
        h.write(2 * C, &data, false).unwrap();
        let all = h.read(C, (3 * C) as u32).unwrap();
        let mut expected = vec![0; (3 * C) as usize];
        expected[C as usize..C as usize + 4096].copy_from_slice(&data);
        assert_eq!(all, expected);
    }

    /// Whether the store's page at `offset` is mapped (mincore).
    fn store_page_mapped(dev: &MemDevice, offset: u64) -> bool {
        let mut resident = 0u8;
        // SAFETY: one page inside the store's mapping, and a one-byte
        // vector for its answer.
        let rc = unsafe {
            libc::mincore(
                dev.store.as_ptr().add(offset as usize).cast(),
                C as usize,
                &mut resident,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        resident & 1 != 0
    }

    #[test]
    fn reads_never_touch_unwritten_chunks() {
        // Chunks 1 and 3 hold data; a read across 0..5 is answered from
        // them and zeros, and maps nothing over 0, 2 and 4.
        let (dev, h) = setup(8 * C, 512);
        h.write(C, &pattern(3, 4096), false).unwrap();
        h.write(3 * C, &pattern(4, 4096), false).unwrap();
        let mut expected = vec![0; (5 * C) as usize];
        expected[C as usize..2 * C as usize].copy_from_slice(&pattern(3, 4096));
        expected[3 * C as usize..4 * C as usize].copy_from_slice(&pattern(4, 4096));
        assert_eq!(h.read(0, (5 * C) as u32).unwrap(), expected);
        let mapped = |dev: &MemDevice| {
            (0..5)
                .map(|c| store_page_mapped(dev, c * C))
                .collect::<Vec<_>>()
        };
        assert_eq!(mapped(&dev), [false, true, false, true, false]);
        // Reads inside one chunk of either kind, and of ragged ranges.
        assert_eq!(h.read(2 * C, C as u32).unwrap(), vec![0; C as usize]);
        assert_eq!(h.read(C + 512, 1024).unwrap(), pattern(3, 4096)[512..1536]);
        assert_eq!(
            h.read(C + 512, (3 * C) as u32).unwrap(),
            expected[(C + 512) as usize..(4 * C + 512) as usize]
        );
        assert_eq!(mapped(&dev), [false, true, false, true, false]);
        // A discard gives chunks back.
        h.discard(C, C).unwrap();
        assert!(!store_page_mapped(&dev, C));
        assert_eq!(
            h.read(0, (4 * C) as u32).unwrap()[3 * C as usize..],
            pattern(4, 4096)[..]
        );
    }

    #[test]
    fn writing_zeros_to_a_hole_allocates_nothing() {
        let (dev, h) = setup(8 * C, 4096);
        h.write(0, &vec![0; (4 * C) as usize], false).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
        h.write(C, &pattern(1, 4096), false).unwrap();
        assert_eq!(dev.allocated_bytes(), C);
        // Zeros over allocated data do overwrite it.
        h.write(C, &[0; 4096], false).unwrap();
        assert_eq!(h.read(C, 4096).unwrap(), vec![0; 4096]);
    }

    #[test]
    fn last_chunk_is_only_as_long_as_the_device() {
        let (dev, h) = setup(C + 4096, 4096);
        let data = pattern(3, 4096);
        h.write(C, &data, false).unwrap();
        assert_eq!(dev.allocated_bytes(), 4096);
        assert_eq!(h.read(C, 4096).unwrap(), data);
        // Discarding it frees it: it is a whole chunk.
        h.discard(C, 4096).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
    }

    /// Fills chunks 0..4 with a pattern and returns it.
    fn fill_four_chunks(h: &Harness) -> Vec<u8> {
        let data = pattern(9, (4 * C) as usize);
        h.write(0, &data, false).unwrap();
        data
    }

    fn check_zeroed_middle(dev: &MemDevice, h: &Harness, data: &[u8]) {
        // Zeroed [C/2, 3.5C): chunks 1 and 2 freed, 0 and 3 cleared in part.
        assert_eq!(dev.allocated_bytes(), 2 * C);
        let mut expected = data.to_vec();
        expected[(C / 2) as usize..(7 * C / 2) as usize].fill(0);
        assert_eq!(h.read(0, (4 * C) as u32).unwrap(), expected);
    }

    #[test]
    fn discard_zeros_the_range_and_frees_whole_chunks() {
        let (dev, h) = setup(8 * C, 512);
        let data = fill_four_chunks(&h);
        assert_eq!(dev.allocated_bytes(), 4 * C);
        h.discard(C / 2, 3 * C).unwrap();
        check_zeroed_middle(&dev, &h, &data);
    }

    #[test]
    fn write_zeroes_zeros_the_range_and_frees_whole_chunks() {
        for may_unmap in [false, true] {
            let (dev, h) = setup(8 * C, 512);
            let data = fill_four_chunks(&h);
            h.write_zeroes(C / 2, 3 * C, may_unmap).unwrap();
            check_zeroed_middle(&dev, &h, &data);
        }
    }

    #[test]
    fn discard_of_unwritten_range_is_fine() {
        let (dev, h) = setup(8 * C, 4096);
        h.discard(0, 8 * C).unwrap();
        h.write_zeroes(4096, 4096, false).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
    }

    #[test]
    fn flush_and_fua_succeed() {
        let (_, h) = setup(8 * C, 4096);
        h.write(0, &pattern(1, 4096), true).unwrap();
        h.flush().unwrap();
        assert_eq!(h.read(0, 4096).unwrap(), pattern(1, 4096));
    }

    #[test]
    fn read_only_refuses_writes() {
        let device = Arc::new(MemDevice::new(8 * C, 4096).unwrap().with_read_only(true));
        let h = Harness::new(device);
        assert!(h.geometry().read_only);
        assert_eq!(h.write(0, &[1; 4096], false), Err(libc::EROFS));
        assert_eq!(h.discard(0, 4096), Err(libc::EROFS));
        assert_eq!(h.read(0, 4096).unwrap(), vec![0; 4096]);
    }

    #[test]
    fn concurrent_writers_to_distinct_ranges() {
        const THREADS: u64 = 8;
        const ROUNDS: u64 = 32;
        // Each thread owns every THREADS-th 12 KiB stripe, so stripes of
        // different threads share chunks (and shards) and straddle chunk
        // boundaries.
        const STRIPE: u64 = 12 * 1024;
        let (_, h) = setup(THREADS * ROUNDS * STRIPE, 4096);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let h = &h;
                s.spawn(move || {
                    for r in 0..ROUNDS {
                        let offset = (r * THREADS + t) * STRIPE;
                        h.write(offset, &pattern(offset, STRIPE as usize), false)
                            .unwrap();
                    }
                });
            }
        });
        for i in 0..THREADS * ROUNDS {
            let offset = i * STRIPE;
            assert_eq!(
                h.read(offset, STRIPE as u32).unwrap(),
                pattern(offset, STRIPE as usize),
                "stripe {i}"
            );
        }
    }

    #[test]
    fn runs_join_neighbouring_pieces_of_a_kind() {
        // Chunks 1 and 2 of one kind, 0 and 3 of the other.
        let r: Vec<_> = runs(C / 2, 3 * C, |p| p.chunk == 1 || p.chunk == 2).collect();
        assert_eq!(
            r,
            vec![
                (C / 2, C / 2, false),
                (C, 2 * C, true),
                (3 * C, C / 2, false)
            ]
        );
        assert_eq!(
            runs(0, 4 * C, |_| true).collect::<Vec<_>>(),
            vec![(0, 4 * C, true)]
        );
        assert_eq!(runs(C, 0, |_| true).count(), 0);
    }

    #[test]
    fn locks_are_taken_in_ascending_order_once_each() {
        let taken = |offset, len| {
            lock_ranges(offset, len)
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
        };
        let group = C * CHUNKS_PER_GROUP;
        assert_eq!(taken(0, 512), vec![0]);
        assert_eq!(taken(group - 512, 1024), vec![0, 1]);
        // Wrapping around the locks: group LOCKS - 1, then 0 (group LOCKS).
        let at = group * (LOCKS as u64 - 1);
        assert_eq!(taken(at, 2 * group), vec![0, LOCKS - 1]);
        // As many groups as locks or more: all of them.
        let all: Vec<usize> = (0..LOCKS).collect();
        assert_eq!(taken(5 * group, group * LOCKS as u64), all);
        assert!(taken(7, 0).is_empty());
    }

    #[test]
    fn a_chunk_written_again_after_a_discard_holds_nothing_old() {
        let (dev, h) = setup(8 * C, 512);
        h.write(C, &pattern(4, C as usize), false).unwrap();
        h.discard(C, C).unwrap();
        assert_eq!(dev.allocated_bytes(), 0);
        // Part of the chunk written: the rest reads as zeros, not as what
        // the discard dropped.
        let data = pattern(5, 512);
        h.write(C + 1024, &data, false).unwrap();
        let mut expected = vec![0; C as usize];
        expected[1024..1536].copy_from_slice(&data);
        assert_eq!(h.read(C, C as u32).unwrap(), expected);
        assert_eq!(dev.allocated_bytes(), C);
    }

    #[test]
    fn a_device_larger_than_the_address_space_is_refused() {
        let err = MemDevice::new(u64::MAX - 4095, 4096)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("mem:"), "{err}");
    }

    #[test]
    fn direct_calls_out_of_range_are_refused() {
        // The engine never sends these; the device must not allocate past
        // its end if someone else does.
        let dev = MemDevice::new(C, 4096).unwrap();
        assert!(!dev.in_bounds(C, 4096));
        assert!(!dev.in_bounds(u64::MAX, 4096));
        assert!(dev.in_bounds(C - 4096, 4096));
    }
}
