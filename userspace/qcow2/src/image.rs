//! One qcow2 image: guest reads and writes mapped through its L1 and L2
//! tables, cluster allocation with copy-on-write, discard, zeroing and
//! ordered metadata write-back.
//!
//! Locking. Metadata changes (allocating clusters, changing L2 entries,
//! flushes) are serialised by `writer`, held for the table updates only:
//! an allocating write copies its data between two short holds, while a
//! per-guest-cluster claim keeps other changes to that cluster (another
//! first write, a discard, zeroing) waiting. Reads, and writes into
//! clusters this image owns alone (L2 entry with the COPIED flag), take no
//! lock of their own on the data path: they look the cluster up under a
//! shared lock on the tables and then read or write the file with
//! positional I/O. So that such a reader never sees a cluster handed to
//! other data between its lookup and its I/O, freed clusters are reused
//! only after a flush, which waits (`reuse_gate`) for every lookup-to-I/O
//! section that began before it.
//!
//! Crash ordering. Metadata changes are written to the file as they are
//! made, so that a daemon killed with `kill -9` leaves in the page cache
//! every change whose request it answered (a module device recovered by
//! another daemon goes on with the data its file system was told was
//! written). Clusters are allocated from a reserve whose refcounts (and
//! any new refcount block or table) are written and synced before the
//! first of them is used; a new L2 table is written and synced before the
//! L1 entry pointing at it; an L2 entry is written after the data of its
//! cluster. Refcount decrements wait for a flush, which syncs everything
//! written so far before it applies them (and syncs again). The refcount
//! of a cluster is therefore never below the number of references to it in
//! the file, durable or in the page cache: a crash of the daemon or of the
//! machine leaves leaked clusters at most (the unused rest of a reserve
//! among them; a clean close gives it back).
//!
//! Compressed writes ([`Options::compress_writes`]). A whole guest cluster
//! written into one that is unallocated, zero or compressed is deflated
//! (or zstd-compressed) before any lock is taken; if that saves a sector
//! or more, the bytes are packed, as qemu packs them, at a cursor running
//! through host clusters taken from the reserve: a new host cluster when
//! they do not fit, the data spilling over only into the next cluster of
//! the file when that is the one the reserve hands out. Every compressed
//! cluster holds one reference to each host cluster its sectors touch.
//! The cursor's host cluster is given spare references in advance (its
//! refcount raised and synced, as the reserve's are), which its next
//! compressed clusters take without a sync each; the L2 entry is written
//! after the data, under `writer` and the guest cluster's claim as for a
//! normal allocation. A crash leaves the spare references as leaks; a
//! close gives them back.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::backing::Backing;
use crate::cache::TableCache;
use crate::compressed::{compress, decompress, CompressedExtent};
use crate::header::{Header, AUTOCLEAR_OFFSET};

/// Where the header's guest size is (followed by crypt_method and l1_size).
const SIZE_OFFSET: u64 = 24;
use crate::refcount::Refcounts;
use crate::{corrupt, lock_file_until, path_error, read_exact_at, Options, FORK_LOCK_WAIT};

/// Bits 9..=55 of L1 and standard L2 entries: a cluster's host offset.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount of the cluster is exactly 1: it may be written in place.
const COPIED: u64 = 1 << 63;
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Version 3: the cluster reads as zeros.
const ZERO: u64 = 1;
/// Bits of a standard L2 entry that must be zero: 1..=8 and 56..=61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Bits of an L1 entry that must be zero: 0..=8 and 56..=62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cluster {
    /// Not in this image: the backing file's data, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a cluster kept allocated for it.
    Zero {
        host: Option<u64>,
        copied: bool,
    },
    Normal {
        host: u64,
        copied: bool,
    },
    Compressed(CompressedExtent),
}

struct Tables {
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: TableCache<Vec<u64>>,
}

/// An open qcow2 image (with its backing chain) that reads and writes
/// guest bytes; see the module documentation for its locking and crash
/// ordering.
pub struct Image {
    path: PathBuf,
    pub(crate) file: File,
    header: Header,
    read_only: bool,
    backing: Option<Backing>,
    tables: RwLock<Tables>,
    pub(crate) refcounts: Mutex<Refcounts>,
    writer: Mutex<()>,
    /// Guest clusters with an allocating write, discard or zeroing in
    /// progress (see [`Image::claim`]).
    busy: Mutex<HashSet<u64>>,
    busy_done: Condvar,
    reuse_gate: RwLock<()>,
    /// Clusters whose refcount of 1 is already durable, handed out by
    /// [`Image::allocate`], last first.
    reserve: Mutex<Vec<u64>>,
    /// Whole clusters written into unallocated, zero or compressed ones are
    /// stored compressed when that saves space ([`Options::compress_writes`]).
    compress_writes: bool,
    /// Changed under `writer` only.
    compressed_cursor: Mutex<Option<CompressedCursor>>,
    /// End of the file as far as clusters go: the file's length rounded up
    /// to a cluster, grown by allocations. No metadata may point past it.
    file_end: AtomicU64,
    /// Host ranges of the header, L1 table and refcount table, which no
    /// data cluster may overlap (the last moves when the table grows).
    fixed_metadata: RwLock<[(u64, u64); 3]>,
    /// The guest size: the header's, until [`Image::grow`].
    size: AtomicU64,
    /// Tests stop a flush after this step, as a crash there would.
    #[cfg(test)]
    crash: crash::Point,
}

/// A claimed guest cluster, released on drop.
struct Claim<'a> {
    image: &'a Image,
    guest_cluster: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.image.busy.lock().remove(&self.guest_cluster);
        self.image.busy_done.notify_all();
    }
}

/// Where compressed clusters go next (see the module documentation).
#[derive(Debug, Clone, Copy)]
struct CompressedCursor {
    /// The host cluster being filled.
    host: u64,
    /// Its first free byte (inside it).
    next: u64,
    /// References its refcount counts that no L2 entry uses yet.
    spare: u64,
}

/// Spare references a compressed host cluster is given at a time: one sync
/// for up to this many compressed clusters (fewer where the refcount width
/// ends; a crash leaks what is left unused).
const SPARE_REFERENCES: u64 = 64;

/// A piece of a guest request lying in one cluster.
struct Piece {
    cluster: u64,
    /// Offset inside the cluster.
    start: usize,
    len: usize,
}

impl Image {
    /// Opens the image at `path` and its backing chain.
    pub fn open(path: &Path, read_only: bool, options: &Options) -> io::Result<Image> {
        Image::open_until(path, read_only, options, Instant::now() + FORK_LOCK_WAIT)
    }

    /// [`open`](Self::open), retrying a lock another process holds until
    /// `deadline`.
    pub(crate) fn open_until(
        path: &Path,
        read_only: bool,
        options: &Options,
        lock_deadline: Instant,
    ) -> io::Result<Image> {
        let canonical = std::fs::canonicalize(path).map_err(|e| {
            io::Error::new(e.kind(), format!("{}: {}", path.display(), path_error(&e)))
        })?;
        let mut chain = vec![canonical];
        Image::open_in_chain(path, read_only, options, &mut chain, lock_deadline)
    }

    pub(crate) fn open_in_chain(
        path: &Path,
        read_only: bool,
        options: &Options,
        chain: &mut Vec<PathBuf>,
        lock_deadline: Instant,
    ) -> io::Result<Image> {
        let in_path = |e: io::Error| {
            io::Error::new(e.kind(), format!("{}: {}", path.display(), path_error(&e)))
        };
        let invalid = |message: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {message}", path.display()),
            )
        };
        let metadata = std::fs::metadata(path).map_err(in_path)?;
        if !metadata.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(in_path)?;
        lock_file_until(&file, path, !read_only, lock_deadline)?;
        let read_header = || -> io::Result<(Header, u64)> {
            let file_len = file.metadata().map_err(in_path)?.len();
            // The header and its extensions sit in the first cluster; read
            // the largest one qemu makes, or the file if shorter.
            let mut first = vec![0u8; (2 << 20).min(file_len) as usize];
            read_exact_at(&file, &mut first, 0).map_err(in_path)?;
            let header = Header::parse(&first, file_len).map_err(|e| invalid(e.to_string()))?;
            Ok((header, file_len))
        };
        let (mut header, mut file_len) = read_header()?;
        let backing = match &header.backing_file {
            Some(name) => Some(Backing::open(
                path,
                name,
                header.backing_format.as_deref(),
                options,
                chain,
            )?),
            None => None,
        };
        if header.is_dirty() && !read_only {
            // Refcounts left stale by lazy refcounts: count them again, as
            // qemu does when it opens such an image for writing.
            crate::rebuild::rebuild(&file, &header, file_len).map_err(in_path)?;
            (header, file_len) = read_header()?;
        }

        let cluster_size = header.cluster_size();
        let file_end = file_len.next_multiple_of(cluster_size);
        let mut l1_raw = vec![0u8; header.l1_size as usize * 8];
        read_exact_at(&file, &mut l1_raw, header.l1_table_offset).map_err(in_path)?;
        let l1: Vec<u64> = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let refcounts = Refcounts::load(
            &file,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            options.refcount_cache_bytes / cluster_size as usize,
            file_end,
        )
        .map_err(in_path)?;

        if header.autoclear_features != 0 && !read_only {
            // Autoclear features (bitmaps, ...) are ones a writer that does
            // not keep them up to date must mark stale; last, so that an
            // open refused for another reason leaves the image as it was.
            file.write_all_at(&0u64.to_be_bytes(), AUTOCLEAR_OFFSET)
                .and_then(|()| file.sync_data())
                .map_err(in_path)?;
        }
        let fixed_metadata = RwLock::new([
            (0, cluster_size),
            (
                header.l1_table_offset,
                (u64::from(header.l1_size) * 8).next_multiple_of(cluster_size),
            ),
            (
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters) * cluster_size,
            ),
        ]);
        Ok(Image {
            path: path.to_owned(),
            file,
            read_only,
            backing,
            tables: RwLock::new(Tables {
                l1,
                l1_dirty: false,
                l2: TableCache::new(options.l2_cache_bytes / cluster_size as usize),
            }),
            refcounts: Mutex::new(refcounts),
            writer: Mutex::new(()),
            busy: Mutex::new(HashSet::new()),
            busy_done: Condvar::new(),
            reuse_gate: RwLock::new(()),
            reserve: Mutex::new(Vec::new()),
            compress_writes: options.compress_writes && !read_only,
            compressed_cursor: Mutex::new(None),
            file_end: AtomicU64::new(file_end),
            fixed_metadata,
            size: AtomicU64::new(header.size),
            header,
            #[cfg(test)]
            crash: crash::Point::default(),
        })
    }

    /// The guest size in bytes, as grown since opening.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grows the guest size to `size` (online resize): the L1 table takes
    /// the entries the new size needs, within the clusters it has (the
    /// new entries are zeros: unallocated, read from the backing file, if
    /// any, or as zeros), then the header says the size and the entry
    /// count in one write of the 16 bytes that hold both, synced. Refused:
    /// shrinking (qemu-img resize --shrink, offline, when nothing uses the
    /// end), a read-only image, and a size whose L1 table would need more
    /// clusters than the image gave it (qemu-img resize, offline).
    pub fn grow(&self, size: u64) -> io::Result<()> {
        let refuse = |message: String| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {message}", self.path.display()),
            ))
        };
        if self.read_only {
            return refuse("opened read-only".into());
        }
        let _writer = self.writer.lock();
        let old = self.size();
        if size < old {
            return refuse(
                "shrinking a qcow2 image is not offered online (qemu-img resize --shrink, with nothing using its end)"
                    .into(),
            );
        }
        let per_l1_entry = self.cluster_size() * self.l2_entries();
        let entries = size.div_ceil(per_l1_entry);
        let l1_room = self.fixed_metadata.read()[1].1 / 8;
        if entries > l1_room || entries > u64::from(u32::MAX) {
            return refuse(format!(
                "{size} bytes need an L1 table of {entries} entries, and the image's has room for {l1_room}: grow it offline with qemu-img resize"
            ));
        }
        let mut tables = self.tables.write();
        let old_entries = tables.l1.len() as u64;
        if entries > old_entries {
            // Zeros on disk first: the header must not count entries that
            // hold anything else (the cluster's tail should be zeros
            // already; qemu writes it so).
            let zeros = vec![0u8; ((entries - old_entries) * 8) as usize];
            self.file
                .write_all_at(&zeros, self.header.l1_table_offset + old_entries * 8)?;
            self.sync()?;
            tables.l1.resize(entries as usize, 0);
        }
        let l1_entries = (tables.l1.len() as u32).to_be_bytes();
        drop(tables);
        // size (24..32), crypt_method (32..36: 0, encrypted images are
        // refused at open), l1_size (36..40).
        let mut fields = [0u8; 16];
        fields[..8].copy_from_slice(&size.to_be_bytes());
        fields[12..].copy_from_slice(&l1_entries);
        self.file.write_all_at(&fields, SIZE_OFFSET)?;
        self.sync()?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// The header as read when the image was opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file's path, as opened.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opened read-only: writes fail.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn cluster_bits(&self) -> u32 {
        self.header.cluster_bits
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    fn has_zero_flag(&self) -> bool {
        self.header.version >= 3
    }

    /// Splits a guest range into per-cluster pieces.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = Piece> + '_ {
        let cluster_size = self.cluster_size();
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let start = at % cluster_size;
            let piece_len = (cluster_size - start).min(end - at);
            let piece = Piece {
                cluster: at / cluster_size,
                start: start as usize,
                len: piece_len as usize,
            };
            at += piece_len;
            Some(piece)
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Whether a data cluster (or L2 table) at `host` would lie in the file
    /// and clear of the header and fixed tables; a corrupt entry fails this.
    fn valid_data_cluster(&self, host: u64) -> bool {
        let size = self.cluster_size();
        host % size == 0
            && host + size <= self.file_end.load(Ordering::Acquire)
            && !self
                .fixed_metadata
                .read()
                .iter()
                .any(|&(start, len)| host < start + len && start < host + size)
    }

    pub(crate) fn classify(&self, guest_cluster: u64, entry: u64) -> io::Result<Cluster> {
        if entry & COMPRESSED != 0 {
            if entry & COPIED != 0 {
                return Err(self.bad_l2(guest_cluster, entry));
            }
            let extent = CompressedExtent::from_entry(entry & !COMPRESSED, self.cluster_bits());
            if extent.offset + extent.len > self.file_end.load(Ordering::Acquire) + 511
                || extent.offset < self.cluster_size()
            {
                return Err(self.bad_l2(guest_cluster, entry));
            }
            return Ok(Cluster::Compressed(extent));
        }
        if entry & L2_RESERVED != 0 || (entry & ZERO != 0 && !self.has_zero_flag()) {
            return Err(self.bad_l2(guest_cluster, entry));
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & COPIED != 0;
        if host != 0 && !self.valid_data_cluster(host) {
            return Err(self.bad_l2(guest_cluster, entry));
        }
        Ok(match (entry & ZERO != 0, host) {
            (true, 0) => Cluster::Zero { host: None, copied },
            (true, host) => Cluster::Zero {
                host: Some(host),
                copied,
            },
            (false, 0) => Cluster::Unallocated,
            (false, host) => Cluster::Normal { host, copied },
        })
    }

    fn bad_l2(&self, guest_cluster: u64, entry: u64) -> io::Error {
        corrupt(format_args!(
            "{}: L2 entry {entry:#018x} of guest cluster {guest_cluster} is invalid or points outside the image",
            self.path.display()
        ))
    }

    /// Loads the L2 table of `l1_index` into `tables` (whose L1 entry must
    /// point at one).
    fn load_l2(&self, tables: &mut Tables, l1_index: u64) -> io::Result<()> {
        let l1_entry = tables.l1[l1_index as usize];
        let host = l1_entry & OFFSET_MASK;
        // Like a data cluster: in the file, clear of the header and tables
        // (a flush writes it back there).
        if l1_entry & L1_RESERVED != 0 || !self.valid_data_cluster(host) {
            return Err(corrupt(format_args!(
                "{}: L1 entry {l1_index} ({l1_entry:#018x}) points outside the image or is invalid",
                self.path.display()
            )));
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        read_exact_at(&self.file, &mut raw, host)?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        tables.l2.insert(l1_index, host, table, false);
        Ok(())
    }

    /// The L2 entry of a guest cluster (0 when its L2 table is absent).
    pub(crate) fn l2_entry(&self, guest_cluster: u64) -> io::Result<u64> {
        let l1_index = guest_cluster / self.l2_entries();
        let l2_index = (guest_cluster % self.l2_entries()) as usize;
        {
            let tables = self.tables.read();
            if tables.l1[l1_index as usize] & OFFSET_MASK == 0 {
                return Ok(0);
            }
            if let Some(table) = tables.l2.get(l1_index) {
                return Ok(table.data[l2_index]);
            }
        }
        let mut tables = self.tables.write();
        if tables.l2.get(l1_index).is_none() {
            if tables.l1[l1_index as usize] & OFFSET_MASK == 0 {
                return Ok(0);
            }
            self.load_l2(&mut tables, l1_index)?;
        }
        Ok(tables.l2.get(l1_index).expect("loaded").data[l2_index])
    }

    /// Reads `buf.len()` guest bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        // Held from the lookups to the last read: no cluster looked up here
        // can be reused meanwhile.
        let _gate = self.reuse_gate.read();
        // Clusters adjacent in the file as in the guest are read at once:
        // (host offset, start in `buf`, length).
        let mut run: Option<(u64, usize, usize)> = None;
        let mut done = 0;
        for piece in self.pieces(offset, buf.len() as u64) {
            let at = done;
            done += piece.len;
            let entry = self.l2_entry(piece.cluster)?;
            let cluster = self.classify(piece.cluster, entry)?;
            if let Cluster::Normal { host, .. } = cluster {
                let host = host + piece.start as u64;
                match &mut run {
                    Some((run_host, run_at, run_len))
                        if *run_host + *run_len as u64 == host && *run_at + *run_len == at =>
                    {
                        *run_len += piece.len;
                    }
                    _ => {
                        if let Some((run_host, run_at, run_len)) = run.take() {
                            self.read_data(run_host, &mut buf[run_at..run_at + run_len])?;
                        }
                        run = Some((host, at, piece.len));
                    }
                }
                continue;
            }
            let out = &mut buf[at..at + piece.len];
            match cluster {
                Cluster::Unallocated => {
                    let guest = piece.cluster * self.cluster_size() + piece.start as u64;
                    match &self.backing {
                        Some(backing) => backing.read(guest, out)?,
                        None => out.fill(0),
                    }
                }
                Cluster::Zero { .. } => out.fill(0),
                Cluster::Compressed(extent) => {
                    let cluster = self.inflate(piece.cluster, extent)?;
                    out.copy_from_slice(&cluster[piece.start..piece.start + piece.len]);
                }
                Cluster::Normal { .. } => unreachable!("handled above"),
            }
        }
        if let Some((run_host, run_at, run_len)) = run {
            self.read_data(run_host, &mut buf[run_at..run_at + run_len])?;
        }
        Ok(())
    }

    /// Reads data at a host offset; what lies past the end of the file (the
    /// tail of a last cluster qemu did not write out) reads as zeros.
    fn read_data(&self, host: u64, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            match self.file.read_at(&mut out[done..], host + done as u64) {
                Ok(0) => {
                    out[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn inflate(&self, guest_cluster: u64, extent: CompressedExtent) -> io::Result<Vec<u8>> {
        let mut input = vec![0u8; extent.len as usize];
        self.read_data(extent.offset, &mut input)?;
        let mut cluster = vec![0u8; self.cluster_size() as usize];
        decompress(self.header.compression, &input, &mut cluster).map_err(|e| {
            corrupt(format_args!(
                "{}: compressed guest cluster {guest_cluster} at {:#x}: {e}",
                self.path.display(),
                extent.offset
            ))
        })?;
        Ok(cluster)
    }

    /// The whole current content of a guest cluster, as a copy-on-write
    /// source.
    fn cluster_content(&self, guest_cluster: u64, cluster: Cluster) -> io::Result<Vec<u8>> {
        let size = self.cluster_size() as usize;
        Ok(match cluster {
            Cluster::Unallocated => {
                let mut data = vec![0u8; size];
                if let Some(backing) = &self.backing {
                    let guest = guest_cluster * self.cluster_size();
                    // The last cluster may extend past the virtual size.
                    let len = (self.size() - guest).min(size as u64) as usize;
                    backing.read(guest, &mut data[..len])?;
                }
                data
            }
            Cluster::Zero { .. } => vec![0u8; size],
            Cluster::Normal { host, .. } => {
                let mut data = vec![0u8; size];
                self.read_data(host, &mut data)?;
                data
            }
            Cluster::Compressed(extent) => self.inflate(guest_cluster, extent)?,
        })
    }

    fn read_only_error(&self) -> io::Error {
        io::Error::from_raw_os_error(libc::EROFS)
    }

    /// Writes `data` at guest `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(self.read_only_error());
        }
        self.check_range(offset, data.len() as u64)?;
        let mut done = 0;
        for piece in self.pieces(offset, data.len() as u64) {
            let chunk = &data[done..done + piece.len];
            done += piece.len;
            if self.write_in_place(&piece, chunk)? {
                continue;
            }
            let whole =
                piece.len as u64 == self.cluster_size() || self.is_last_cluster_tail(&piece);
            if self.compress_writes && whole {
                self.write_compressed(&piece, chunk)?;
            } else {
                let _claim = self.claim(piece.cluster);
                self.write_allocating(&piece, chunk)?;
            }
        }
        Ok(())
    }

    /// Writes into a cluster this image alone owns, if it is one; returns
    /// whether it was.
    fn write_in_place(&self, piece: &Piece, chunk: &[u8]) -> io::Result<bool> {
        let _gate = self.reuse_gate.read();
        let entry = self.l2_entry(piece.cluster)?;
        match self.classify(piece.cluster, entry)? {
            Cluster::Normal { host, copied: true } => {
                self.file.write_all_at(chunk, host + piece.start as u64)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// With the cluster claimed (and `writer` not held): writes a piece into
    /// a cluster that needs allocating (or copying, or un-zeroing) first.
    /// The metadata changes are made under `writer`, the data copy between
    /// them without it, so that first writes to different clusters copy in
    /// parallel.
    fn write_allocating(&self, piece: &Piece, chunk: &[u8]) -> io::Result<()> {
        let (cluster, target, old) = {
            let _writer = self.writer.lock();
            let entry = self.l2_entry(piece.cluster)?;
            let cluster = self.classify(piece.cluster, entry)?;
            if let Cluster::Normal { host, copied: true } = cluster {
                // Another writer allocated it while this one waited; the
                // claim keeps it from being freed.
                drop(_writer);
                return self.file.write_all_at(chunk, host + piece.start as u64);
            }
            self.own_l2_table(piece.cluster / self.l2_entries())?;
            let (target, old) = match cluster {
                // A zeroed cluster kept allocated and owned: reuse it.
                Cluster::Zero {
                    host: Some(host),
                    copied: true,
                } => (host, None),
                _ => (self.allocate()?, self.references(cluster)),
            };
            (cluster, target, old)
        };
        let fresh = !matches!(
            cluster,
            Cluster::Zero {
                host: Some(_),
                copied: true
            }
        );
        // The old cluster (a copy-on-write source) stays referenced until
        // the new one replaces it below, so nothing frees it meanwhile.
        let whole = piece.start == 0 && piece.len as u64 == self.cluster_size();
        let copied = if whole {
            self.file.write_all_at(chunk, target)
        } else {
            self.cluster_content(piece.cluster, cluster)
                .and_then(|mut content| {
                    content[piece.start..piece.start + piece.len].copy_from_slice(chunk);
                    self.file.write_all_at(&content, target)
                })
        };
        let _writer = self.writer.lock();
        match copied.and_then(|()| self.set_l2_entry(piece.cluster, target | COPIED)) {
            Ok(()) => self.drop_references(old),
            Err(e) => {
                if fresh {
                    // Unused: free it again at the next flush.
                    self.refcounts.lock().defer_decrement(target);
                }
                return Err(e);
            }
        }
        self.flush_if_cache_full()
    }

    /// Writes a whole guest cluster (`chunk`: the cluster, or the image's
    /// end in its last one) that is not a cluster this image owns: stored
    /// compressed into an unallocated, zero or compressed cluster when that
    /// saves a sector or more, else as [`write_allocating`] does.
    ///
    /// [`write_allocating`]: Self::write_allocating
    fn write_compressed(&self, piece: &Piece, chunk: &[u8]) -> io::Result<()> {
        let cluster_size = self.cluster_size() as usize;
        // Outside any lock. The last cluster's part past the image's end is
        // zeros, as qemu writes it.
        let compressed = if chunk.len() == cluster_size {
            compress(self.header.compression, chunk, cluster_size - 512)
        } else {
            let mut padded = vec![0u8; cluster_size];
            padded[..chunk.len()].copy_from_slice(chunk);
            compress(self.header.compression, &padded, cluster_size - 512)
        };
        let _claim = self.claim(piece.cluster);
        let Some(compressed) = compressed else {
            return self.write_allocating(piece, chunk);
        };
        let (cluster, extent) = {
            let _writer = self.writer.lock();
            let entry = self.l2_entry(piece.cluster)?;
            let cluster = self.classify(piece.cluster, entry)?;
            match cluster {
                Cluster::Normal { host, copied: true } => {
                    // Allocated by another writer while this one waited;
                    // the claim keeps it from being freed.
                    drop(_writer);
                    return self.file.write_all_at(chunk, host);
                }
                Cluster::Normal { copied: false, .. } => {
                    // Shared with a snapshot: copied as a normal cluster.
                    drop(_writer);
                    return self.write_allocating(piece, chunk);
                }
                _ => {}
            }
            self.own_l2_table(piece.cluster / self.l2_entries())?;
            let offset = self.place_compressed(compressed.len() as u64)?;
            (
                cluster,
                CompressedExtent::of_bytes(offset, compressed.len() as u64),
            )
        };
        // The references placing took keep these bytes from being freed or
        // handed to other data meanwhile.
        let written = self.file.write_all_at(&compressed, extent.offset);
        let _writer = self.writer.lock();
        let entry = COMPRESSED | extent.to_entry(self.cluster_bits());
        match written.and_then(|()| self.set_l2_entry(piece.cluster, entry)) {
            Ok(()) => self.drop_references(self.references(cluster)),
            Err(e) => {
                // Unused (or maybe used by an entry the next flush puts
                // back): its references go at the next flush.
                self.drop_references(self.references(Cluster::Compressed(extent)));
                return Err(e);
            }
        }
        self.flush_if_cache_full()
    }

    /// Under `writer`: room for `len` compressed bytes at the cursor,
    /// taking one reference to each host cluster they touch (their
    /// refcounts durable already); returns their host offset.
    fn place_compressed(&self, len: u64) -> io::Result<u64> {
        let cluster_size = self.cluster_size();
        let mut cursor = self.compressed_cursor.lock();
        // A cursor whose cluster has no spare reference left gets more,
        // or is left (a refcount at its width's maximum).
        if let Some(current) = cursor.as_mut() {
            let fits = current.next + len <= current.host + cluster_size;
            if current.spare == 0 && fits && !self.add_spare_references(current)? {
                *cursor = None;
            }
        }
        if let Some(current) = cursor.as_mut() {
            if current.next + len <= current.host + cluster_size {
                let offset = current.next;
                current.next += len;
                current.spare -= 1;
                if current.next == current.host + cluster_size {
                    self.leave_cursor(&mut cursor);
                }
                return Ok(offset);
            }
        }
        let fresh = self.allocate()?;
        // Spilling over from the cursor's cluster into the next one.
        if let Some(current) = cursor.as_mut() {
            let contiguous = fresh == current.host + cluster_size;
            let spill = contiguous
                && (current.spare > 0
                    || self.add_spare_references(current).inspect_err(|_| {
                        // Unused: free it again at the next flush.
                        self.refcounts.lock().defer_decrement(fresh);
                    })?);
            if spill {
                let offset = current.next;
                current.spare -= 1;
                self.leave_cursor(&mut cursor);
                *cursor = Some(CompressedCursor {
                    host: fresh,
                    next: offset + len,
                    spare: 0,
                });
                return Ok(offset);
            }
        }
        self.leave_cursor(&mut cursor);
        *cursor = Some(CompressedCursor {
            host: fresh,
            next: fresh + len,
            spare: 0,
        });
        Ok(fresh)
    }

    /// Under `writer`: raises the refcount of the cursor's cluster by up to
    /// [`SPARE_REFERENCES`] and makes that durable; false when its
    /// refcount is at the maximum already.
    fn add_spare_references(&self, cursor: &mut CompressedCursor) -> io::Result<bool> {
        let mut refcounts = self.refcounts.lock();
        let added = refcounts.add_references(&self.file, cursor.host, SPARE_REFERENCES)?;
        if added == 0 {
            return Ok(false);
        }
        let written = refcounts
            .write_back(&self.file, || self.sync())
            .and_then(|_| self.sync());
        if let Err(e) = written {
            // Not durable: used by nothing; dropped at the next flush.
            for _ in 0..added {
                refcounts.defer_decrement(cursor.host);
            }
            return Err(e);
        }
        cursor.spare += added;
        Ok(true)
    }

    /// Under `writer`: the cursor leaves its cluster, giving its spare
    /// references back at the next flush.
    fn leave_cursor(&self, cursor: &mut Option<CompressedCursor>) {
        if let Some(left) = cursor.take() {
            let mut refcounts = self.refcounts.lock();
            for _ in 0..left.spare {
                refcounts.defer_decrement(left.host);
            }
        }
    }

    /// Marks a guest cluster as having a metadata change in progress,
    /// waiting while another has: allocating writes, discards and zeroing
    /// of one cluster happen one at a time. Taken before `writer`, never
    /// while holding it.
    fn claim(&self, guest_cluster: u64) -> Claim<'_> {
        let mut busy = self.busy.lock();
        while !busy.insert(guest_cluster) {
            self.busy_done.wait(&mut busy);
        }
        Claim {
            image: self,
            guest_cluster,
        }
    }

    /// The host clusters an L2 entry holds references to.
    fn references(&self, cluster: Cluster) -> Option<Vec<u64>> {
        match cluster {
            Cluster::Unallocated | Cluster::Zero { host: None, .. } => None,
            Cluster::Zero {
                host: Some(host), ..
            }
            | Cluster::Normal { host, .. } => Some(vec![host]),
            Cluster::Compressed(extent) => {
                Some(extent.host_clusters(self.cluster_bits()).collect())
            }
        }
    }

    fn drop_references(&self, clusters: Option<Vec<u64>>) {
        if let Some(clusters) = clusters {
            let mut refcounts = self.refcounts.lock();
            for host in clusters {
                refcounts.defer_decrement(host);
            }
        }
    }

    /// Under `writer`: a cluster for new data or a new L2 table, from the
    /// reserve (refilled when empty). The caller writes it before anything
    /// points at it.
    fn allocate(&self) -> io::Result<u64> {
        let mut reserve = self.reserve.lock();
        if reserve.is_empty() {
            self.refill_reserve(&mut reserve)?;
        }
        let host = reserve.pop().expect("refilled");
        drop(reserve);
        if !self.valid_data_cluster(host) {
            // Its refcount said free, but it is the header or a table:
            // the refcounts are corrupt; write nothing there.
            return Err(corrupt(format_args!(
                "{}: cluster {host:#x} has refcount 0 but holds metadata",
                self.path.display()
            )));
        }
        Ok(host)
    }

    /// Allocates the next clusters (32 MiB of them, 16 to 1024 clusters),
    /// then writes their refcounts, with any refcount block or table that
    /// took, and syncs them: from then on metadata written to the file may
    /// point at them in any order and at any time, and a crash leaves the
    /// ones not yet used as leaks.
    fn refill_reserve(&self, reserve: &mut Vec<u64>) -> io::Result<()> {
        let count = ((32u64 << 20) >> self.cluster_bits()).clamp(16, 1024);
        let mut refcounts = self.refcounts.lock();
        let mut hosts = Vec::with_capacity(count as usize);
        let mut failed = None;
        for _ in 0..count {
            match refcounts.allocate(&self.file) {
                Ok(host) => hosts.push(host),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        self.file_end
            .fetch_max(refcounts.file_end(), Ordering::AcqRel);
        self.fixed_metadata.write()[2] = refcounts.table_range();
        let written = refcounts
            .write_back(&self.file, || self.sync())
            .and_then(|_| self.sync());
        if let Err(e) = written {
            // Not durable: nothing may point at them; free them again at
            // the next flush.
            for host in hosts {
                refcounts.defer_decrement(host);
            }
            return Err(e);
        }
        if hosts.is_empty() {
            return Err(failed.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        hosts.reverse();
        *reserve = hosts;
        Ok(())
    }

    /// Under `writer`: gives the unused reserve back at the next flush.
    fn release_reserve(&self) {
        self.leave_cursor(&mut self.compressed_cursor.lock());
        let unused = std::mem::take(&mut *self.reserve.lock());
        let mut refcounts = self.refcounts.lock();
        for host in unused {
            refcounts.defer_decrement(host);
        }
    }

    /// Gives back the unused reserve and flushes: what closing the image
    /// does, and what a daemon does before it lets another one have it.
    pub fn close(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _writer = self.writer.lock();
        self.release_reserve();
        self.flush_locked()
    }

    /// Under `writer`: makes the L2 table of `l1_index` one this image owns
    /// alone (allocating an empty one, or copying one shared with a
    /// snapshot) and loads it.
    fn own_l2_table(&self, l1_index: u64) -> io::Result<()> {
        let mut tables = self.tables.write();
        let l1_entry = tables.l1[l1_index as usize];
        let old_host = l1_entry & OFFSET_MASK;
        if old_host != 0 && l1_entry & COPIED != 0 {
            if tables.l2.get(l1_index).is_none() {
                self.load_l2(&mut tables, l1_index)?;
            }
            return Ok(());
        }
        let data = if old_host == 0 {
            vec![0u64; self.l2_entries() as usize]
        } else {
            if tables.l2.get(l1_index).is_none() {
                self.load_l2(&mut tables, l1_index)?;
            }
            tables.l2.get(l1_index).expect("loaded").data.clone()
        };
        let host = self.allocate()?;
        // The table, synced, before the L1 entry pointing at it.
        let raw: Vec<u8> = data.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_entry_offset = self.header.l1_table_offset + l1_index * 8;
        let written = self
            .file
            .write_all_at(&raw, host)
            .and_then(|()| self.sync())
            .and_then(|()| {
                self.file
                    .write_all_at(&(host | COPIED).to_be_bytes(), l1_entry_offset)
            });
        if let Err(e) = written {
            // The L1 entry may have been written: keep it in the cached
            // L1 table as it was and rewrite that at the next flush.
            tables.l1_dirty = true;
            drop(tables);
            self.refcounts.lock().defer_decrement(host);
            return Err(e);
        }
        tables.l2.insert(l1_index, host, data, false);
        tables.l1[l1_index as usize] = host | COPIED;
        drop(tables);
        if old_host != 0 {
            self.refcounts.lock().defer_decrement(old_host);
        }
        Ok(())
    }

    /// Under `writer`, after [`own_l2_table`](Self::own_l2_table).
    fn set_l2_entry(&self, guest_cluster: u64, entry: u64) -> io::Result<()> {
        let l1_index = guest_cluster / self.l2_entries();
        let l2_index = (guest_cluster % self.l2_entries()) as usize;
        let mut tables = self.tables.write();
        if tables.l2.get(l1_index).is_none() {
            self.load_l2(&mut tables, l1_index)?;
        }
        let table = tables.l2.get_mut(l1_index).expect("loaded");
        let old = std::mem::replace(&mut table.data[l2_index], entry);
        let written = self
            .file
            .write_all_at(&entry.to_be_bytes(), table.host + l2_index as u64 * 8);
        if let Err(e) = written {
            // Maybe written: the table as cached goes back at the next
            // flush.
            table.data[l2_index] = old;
            table.dirty = true;
            return Err(e);
        }
        Ok(())
    }

    /// Discards whole clusters of the range (a partial cluster is left as
    /// it is, which a discard allows): they read as zeros afterwards (v3,
    /// or without a backing file) or as the backing file (v2).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(self.read_only_error());
        }
        self.check_range(offset, len)?;
        for piece in self.pieces(offset, len) {
            if piece.len as u64 == self.cluster_size() || self.is_last_cluster_tail(&piece) {
                let target = if self.has_zero_flag() && self.backing.is_some() {
                    ZERO
                } else {
                    0
                };
                let _claim = self.claim(piece.cluster);
                let _writer = self.writer.lock();
                self.replace_cluster(piece.cluster, target)?;
                self.flush_if_cache_full()?;
            }
        }
        Ok(())
    }

    /// Whether the piece runs from the start of the image's last cluster to
    /// the end of the image (a cluster partly past the virtual size).
    fn is_last_cluster_tail(&self, piece: &Piece) -> bool {
        piece.start == 0 && piece.cluster * self.cluster_size() + piece.len as u64 == self.size()
    }

    /// Under `writer`: points a guest cluster at no host cluster (`ZERO` or
    /// unallocated) and drops what it held.
    fn replace_cluster(&self, guest_cluster: u64, target: u64) -> io::Result<()> {
        let entry = self.l2_entry(guest_cluster)?;
        let cluster = self.classify(guest_cluster, entry)?;
        if entry == target {
            return Ok(());
        }
        let l1_index = guest_cluster / self.l2_entries();
        if target == 0 && self.tables.read().l1[l1_index as usize] & OFFSET_MASK == 0 {
            return Ok(());
        }
        self.own_l2_table(l1_index)?;
        self.set_l2_entry(guest_cluster, target)?;
        self.drop_references(self.references(cluster));
        Ok(())
    }

    /// Makes the range read as zeros: whole clusters become zero clusters
    /// (v3; without `may_unmap` one this image owns keeps its storage, so
    /// that writing it again needs no allocation) or unallocated (v2
    /// without a backing file); the rest is written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(self.read_only_error());
        }
        self.check_range(offset, len)?;
        let zeros = vec![0u8; self.cluster_size() as usize];
        for piece in self.pieces(offset, len) {
            let _claim = self.claim(piece.cluster);
            let writer = self.writer.lock();
            let whole =
                piece.len as u64 == self.cluster_size() || self.is_last_cluster_tail(&piece);
            let entry = self.l2_entry(piece.cluster)?;
            let cluster = self.classify(piece.cluster, entry)?;
            let reads_zero = match cluster {
                Cluster::Zero { .. } => true,
                Cluster::Unallocated => self.backing.is_none(),
                _ => false,
            };
            if reads_zero {
                // Already zeros.
            } else if whole && self.has_zero_flag() {
                match cluster {
                    Cluster::Normal { host, copied: true } if !may_unmap => {
                        self.own_l2_table(piece.cluster / self.l2_entries())?;
                        self.set_l2_entry(piece.cluster, host | COPIED | ZERO)?;
                    }
                    _ => self.replace_cluster(piece.cluster, ZERO)?,
                }
            } else if whole && self.backing.is_none() {
                self.replace_cluster(piece.cluster, 0)?;
            } else {
                let chunk = &zeros[..piece.len];
                drop(writer);
                match cluster {
                    // The claim keeps it from being freed.
                    Cluster::Normal { host, copied: true } => {
                        self.file.write_all_at(chunk, host + piece.start as u64)?
                    }
                    _ => self.write_allocating(&piece, chunk)?,
                }
                continue;
            }
            self.flush_if_cache_full()?;
        }
        Ok(())
    }

    /// Under `writer`: writes metadata back early when the caches hold
    /// nothing but dirty tables.
    fn flush_if_cache_full(&self) -> io::Result<()> {
        let full = self.tables.read().l2.over_capacity() || self.refcounts.lock().over_capacity();
        if full {
            self.flush_locked()?;
        }
        Ok(())
    }

    /// Makes every write so far durable, metadata in crash-safe order.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _writer = self.writer.lock();
        self.flush_locked()
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Under `writer`; see the module's documentation for the order.
    fn flush_locked(&self) -> io::Result<()> {
        // 1. Refcount increments, and new blocks before the table entries
        //    that point at them. The sync after covers guest data too.
        self.refcounts
            .lock()
            .write_back(&self.file, || self.sync())?;
        self.sync()?;
        self.crash_point(1)?;

        // 2. L2 tables, then 3. the L1 table pointing at new ones.
        let mut wrote_l2 = false;
        {
            let mut tables = self.tables.write();
            for key in tables.l2.dirty_keys() {
                let table = tables.l2.get_mut(key).expect("dirty key");
                let raw: Vec<u8> = table.data.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.file.write_all_at(&raw, table.host)?;
                table.dirty = false;
                wrote_l2 = true;
            }
        }
        if wrote_l2 {
            self.sync()?;
        }
        self.crash_point(2)?;
        let l1 = {
            let mut tables = self.tables.write();
            std::mem::take(&mut tables.l1_dirty).then(|| tables.l1.clone())
        };
        if let Some(l1) = l1 {
            let raw: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            if let Err(e) = self
                .file
                .write_all_at(&raw, self.header.l1_table_offset)
                .and_then(|()| self.sync())
            {
                self.tables.write().l1_dirty = true;
                return Err(e);
            }
        }

        self.crash_point(3)?;

        // 4. Decrements, now that nothing durable uses those references.
        let freed = {
            let mut refcounts = self.refcounts.lock();
            if !refcounts.has_pending_decrements() {
                return Ok(());
            }
            let freed = refcounts.apply_decrements(&self.file)?;
            refcounts.write_back(&self.file, || self.sync())?;
            freed
        };
        self.sync()?;
        self.crash_point(4)?;
        {
            // A cursor whose cluster was freed (it had no spare reference,
            // and its compressed clusters were all replaced) starts anew.
            let mut cursor = self.compressed_cursor.lock();
            if cursor.is_some_and(|c| freed.contains(&c.host)) {
                *cursor = None;
            }
        }
        // Give the freed space back to the file system; it reads as zeros,
        // which a reader that looked the cluster up before it was freed may
        // see (a discard racing with a read).
        for host in freed {
            punch_hole(&self.file, host, self.cluster_size());
        }
        // Wait until no lookup made before the clusters were freed can
        // still read or write them: from here on they may be reused.
        drop(self.reuse_gate.write());
        Ok(())
    }
}

/// Frees the file's storage of a range (best effort: a file system
/// without hole punching keeps the old bytes, which nothing reads).
fn punch_hole(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on a descriptor this function borrows for the
    // call; it touches no memory of ours.
    let result = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if result != 0 {
        log::debug!(
            "punching a hole at {offset:#x}: {}",
            io::Error::last_os_error()
        );
    }
}

impl Image {
    /// Fails a flush after `step` when a test asked for a crash there;
    /// nothing after it reaches the file, close included.
    #[cfg(test)]
    fn crash_point(&self, step: usize) -> io::Result<()> {
        self.crash.at(step)
    }

    #[cfg(not(test))]
    fn crash_point(&self, _step: usize) -> io::Result<()> {
        Ok(())
    }

    /// Simulates a crash after `step` of the next flush (0: before it).
    #[cfg(test)]
    pub(crate) fn crash_after(&self, step: usize) {
        self.crash.arm(step);
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        #[cfg(test)]
        if self.crash.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.close() {
            log::error!("{}: flushing on close: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod crash {
    use std::io;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    pub struct Point {
        after: AtomicUsize,
        pub crashed: AtomicBool,
    }

    impl Default for Point {
        fn default() -> Point {
            Point {
                after: AtomicUsize::new(usize::MAX),
                crashed: AtomicBool::new(false),
            }
        }
    }

    impl Point {
        pub fn arm(&self, step: usize) {
            self.after.store(step, Ordering::SeqCst);
            if step == 0 {
                self.crashed.store(true, Ordering::SeqCst);
            }
        }

        pub fn at(&self, step: usize) -> io::Result<()> {
            if self.crashed.load(Ordering::SeqCst) || self.after.load(Ordering::SeqCst) == step {
                self.crashed.store(true, Ordering::SeqCst);
                return Err(io::Error::other("simulated crash"));
            }
            Ok(())
        }
    }
}
