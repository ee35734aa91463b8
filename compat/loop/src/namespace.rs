//! The one-file filesystem: a root directory holding a single regular file
//! whose contents are the block device. The loop driver opens that file, so
//! this is everything the kernel asks of the filesystem besides block I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuse_blk::proto::abi::{
    self, fattr, fopen, Attr, AttrOut, EntryOut, OpenOut, StatfsOut, ROOT_ID,
};
use fuse_blk::proto::reply::push_dirent;
use fuse_blk::proto::{Operation, Request};
use fuse_blk::{Geometry, Namespace, Responder};
use parking_lot::{Condvar, Mutex};
use zerocopy::IntoBytes;

use crate::passthrough::{Backing, Passthrough};

/// Node id of the device file.
pub const FILE_ID: u64 = 2;

/// Attributes never change behind the kernel's back (a resize tells it, see
/// [`OneFileNamespace::set_size`]), so it may cache them for as long as it
/// likes.
const TTL: Duration = Duration::from_secs(24 * 3600);

const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFREG: u32 = libc::S_IFREG;
const DT_DIR: u32 = 4;
const DT_REG: u32 = 8;

/// The namespace of one device: `/<file_name>` of `geometry.size` bytes.
pub struct OneFileNamespace {
    file_name: String,
    geometry: Geometry,
    /// The device file's size: the geometry's until a resize.
    size: AtomicU64,
    created: SystemTime,
    /// Open handles of the device file; detaching waits for the loop
    /// driver's to be released before unmounting.
    open_files: Mutex<u64>,
    released: Condvar,
    /// Whether opens of the device file pass reads and writes through to
    /// a backing file.
    passthrough: Passthrough,
}

impl OneFileNamespace {
    /// A root directory holding one file, `file_name`, of the device's size;
    /// no handle open, no passthrough.
    pub fn new(file_name: &str, geometry: Geometry) -> OneFileNamespace {
        OneFileNamespace {
            file_name: file_name.to_owned(),
            size: AtomicU64::new(geometry.size),
            geometry,
            created: SystemTime::now(),
            open_files: Mutex::new(0),
            released: Condvar::new(),
            passthrough: Passthrough::new(Backing::Off),
        }
    }

    /// The device file's name in the root directory.
    pub fn file_name(&self) -> &str {
        &self.file_name
    }

    /// The device file's size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Gives the device file a new size. The kernel keeps the attributes
    /// it cached until told to forget them: see
    /// [`encode_inval_attributes`](fuse_blk::proto::reply::encode_inval_attributes).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Open handles of the device file (OPENs not yet RELEASEd).
    pub fn open_files(&self) -> u64 {
        *self.open_files.lock()
    }

    /// Takes over the count of a predecessor daemon's namespace.
    pub fn set_open_files(&self, open: u64) {
        *self.open_files.lock() = open;
    }

    /// Sets whether and how later opens of the device file pass through.
    pub fn set_passthrough(&self, backing: Backing) {
        self.passthrough.set(backing);
    }

    /// The backing id of the device file's opens (registering the file if
    /// none has been opened yet); `None` without passthrough.
    pub fn backing_id(&self) -> Option<i32> {
        self.passthrough.backing_id()
    }

    /// Waits until no handle of the device file is open; false on timeout.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let mut open = self.open_files.lock();
        let deadline = std::time::Instant::now() + timeout;
        while *open > 0 {
            if self.released.wait_until(&mut open, deadline).timed_out() {
                return *open == 0;
            }
        }
        true
    }

    fn attr(&self, ino: u64) -> Option<Attr> {
        let since_epoch = self.created.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (mode, size, nlink) = match ino {
            ROOT_ID => (S_IFDIR | 0o700, 0, 2),
            FILE_ID if self.geometry.read_only => (S_IFREG | 0o400, self.size(), 1),
            FILE_ID => (S_IFREG | 0o600, self.size(), 1),
            _ => return None,
        };
        Some(Attr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: since_epoch.as_secs(),
            mtime: since_epoch.as_secs(),
            ctime: since_epoch.as_secs(),
            atimensec: since_epoch.subsec_nanos(),
            mtimensec: since_epoch.subsec_nanos(),
            ctimensec: since_epoch.subsec_nanos(),
            mode,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: self.geometry.physical_block_size,
            flags: 0,
        })
    }

    fn reply_attr(&self, ino: u64, reply: Responder) {
        match self.attr(ino) {
            Some(attr) => {
                let out = AttrOut {
                    attr_valid: TTL.as_secs(),
                    attr,
                    ..AttrOut::default()
                };
                reply.ok(&[out.as_bytes()]);
            }
            None => reply.error(libc::ENOENT),
        }
    }

    fn lookup(&self, parent: u64, name: &[u8], reply: Responder) {
        if parent != ROOT_ID || name != self.file_name.as_bytes() {
            return reply.error(libc::ENOENT);
        }
        let Some(attr) = self.attr(FILE_ID) else {
            return reply.error(libc::ENOENT);
        };
        let out = EntryOut {
            nodeid: FILE_ID,
            generation: 1,
            entry_valid: TTL.as_secs(),
            attr_valid: TTL.as_secs(),
            attr,
            ..EntryOut::default()
        };
        reply.ok(&[out.as_bytes()]);
    }

    fn setattr(&self, ino: u64, arg: &abi::SetattrIn, reply: Responder) {
        // The size of a block device changes only by `fuse-blk resize`;
        // ownership, mode and times of the file mean nothing and are
        // accepted unchanged.
        if arg.valid & fattr::SIZE != 0 && (ino != FILE_ID || arg.size != self.size()) {
            return reply.error(libc::EPERM);
        }
        self.reply_attr(ino, reply);
    }

    fn open(&self, ino: u64, arg: &abi::OpenIn, reply: Responder) {
        if ino == ROOT_ID {
            return reply.error(libc::EISDIR);
        }
        if ino != FILE_ID {
            return reply.error(libc::ENOENT);
        }
        let writing = (arg.flags as i32 & libc::O_ACCMODE) != libc::O_RDONLY;
        if writing && self.geometry.read_only {
            return reply.error(libc::EROFS);
        }
        let (open_flags, backing_id) = match self.passthrough.backing_id() {
            Some(backing_id) => (fopen::PASSTHROUGH, backing_id),
            // Direct writes to distinct ranges need not serialise on the
            // inode lock: the loop driver's queue depth reaches the daemon.
            None => (fopen::PARALLEL_DIRECT_WRITES, 0),
        };
        let out = OpenOut {
            fh: 0,
            open_flags,
            backing_id,
        };
        *self.open_files.lock() += 1;
        reply.ok(&[out.as_bytes()]);
    }

    fn release(&self, reply: Responder) {
        let mut open = self.open_files.lock();
        *open = open.saturating_sub(1);
        if *open == 0 {
            self.released.notify_all();
        }
        drop(open);
        reply.ok(&[]);
    }

    fn readdir(&self, ino: u64, arg: &abi::ReadIn, reply: Responder) {
        if ino != ROOT_ID {
            return reply.error(libc::ENOTDIR);
        }
        let entries: [(u64, u32, &[u8]); 3] = [
            (ROOT_ID, DT_DIR, b"."),
            (ROOT_ID, DT_DIR, b".."),
            (FILE_ID, DT_REG, self.file_name.as_bytes()),
        ];
        let mut buf = Vec::new();
        for (index, (entry_ino, typ, name)) in entries.iter().enumerate().skip(arg.offset as usize)
        {
            if !push_dirent(
                &mut buf,
                arg.size as usize,
                *entry_ino,
                index as u64 + 1,
                *typ,
                name,
            ) {
                break;
            }
        }
        reply.ok(&[&buf]);
    }

    fn statfs(&self, reply: Responder) {
        // The loop driver takes its discard granularity from f_bsize.
        let bsize = self.geometry.logical_block_size;
        let out = StatfsOut {
            blocks: self.geometry.blocks(),
            bfree: 0,
            bavail: 0,
            files: 1,
            ffree: 0,
            bsize,
            namelen: 255,
            frsize: bsize,
            ..StatfsOut::default()
        };
        reply.ok(&[out.as_bytes()]);
    }
}

impl Namespace for OneFileNamespace {
    fn handle(&self, request: &Request<'_>, reply: Responder) {
        let ino = request.header.nodeid;
        match request.operation {
            Operation::Lookup { name } => self.lookup(ino, name, reply),
            Operation::Getattr(_) => self.reply_attr(ino, reply),
            Operation::Setattr(arg) => self.setattr(ino, &arg, reply),
            Operation::Open(arg) => self.open(ino, &arg, reply),
            Operation::Release(_) => self.release(reply),
            Operation::Opendir(_) if ino == ROOT_ID => reply.ok(&[OpenOut::default().as_bytes()]),
            Operation::Opendir(_) => reply.error(libc::ENOTDIR),
            Operation::Readdir(arg) => self.readdir(ino, &arg, reply),
            Operation::Releasedir(_) | Operation::Fsyncdir(_) => reply.ok(&[]),
            Operation::Statfs => self.statfs(reply),
            Operation::Access(arg)
                if arg.mask & libc::W_OK as u32 != 0 && self.geometry.read_only =>
            {
                reply.error(libc::EROFS)
            }
            Operation::Access(_) => reply.ok(&[]),
            _ => reply.error(libc::ENOSYS),
        }
    }
}
