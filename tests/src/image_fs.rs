//! A small `fuser::Filesystem` as someone might already have one: a root
//! directory holding one regular file, `disk.img`, kept in memory (or in a
//! host file, for a device that a second daemon takes over). The tests serve
//! it as a block device through the fuser adapter, unchanged.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, WriteFlags,
};

const ROOT: u64 = 1;
const IMAGE: u64 = 2;
const TTL: Duration = Duration::from_secs(1);
const PUNCH_HOLE: i32 = 0x02;
const ZERO_RANGE: i32 = 0x10;

/// `/disk.img` of a fixed size, zero-filled at first.
pub struct ImageFs {
    store: Store,
}

/// Where the bytes of `disk.img` are.
enum Store {
    Memory(Arc<Mutex<Vec<u8>>>),
    /// A host file, which every daemon serving the image sees alike.
    File {
        file: File,
        size: u64,
    },
}

impl ImageFs {
    /// Returns the filesystem and a handle on the file's bytes.
    pub fn new(size: usize) -> (ImageFs, Arc<Mutex<Vec<u8>>>) {
        let data = Arc::new(Mutex::new(vec![0u8; size]));
        let fs = ImageFs {
            store: Store::Memory(data.clone()),
        };
        (fs, data)
    }

    /// `disk.img` holds what `file` holds, as long as it is now.
    pub fn on_file(file: File) -> std::io::Result<ImageFs> {
        let size = file.metadata()?.len();
        Ok(ImageFs {
            store: Store::File { file, size },
        })
    }

    fn size(&self) -> u64 {
        match &self.store {
            Store::Memory(data) => data.lock().unwrap().len() as u64,
            Store::File { size, .. } => *size,
        }
    }

    /// `len` bytes at `offset`, cut short at the end of the image.
    fn read_at(&self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let start = offset.min(self.size());
        let end = (start + u64::from(len)).min(self.size());
        match &self.store {
            Store::Memory(data) => Ok(data.lock().unwrap()[start as usize..end as usize].to_vec()),
            Store::File { file, .. } => {
                let mut buf = vec![0; (end - start) as usize];
                file.read_exact_at(&mut buf, start)?;
                Ok(buf)
            }
        }
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        match &self.store {
            Store::Memory(data) => {
                let start = offset as usize;
                data.lock().unwrap()[start..start + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            Store::File { file, .. } => file.write_all_at(bytes, offset),
        }
    }

    /// Zeros `[offset, offset + len)`, cut short at the end of the image.
    fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let start = offset.min(self.size());
        let end = offset.saturating_add(len).min(self.size());
        match &self.store {
            Store::Memory(data) => {
                data.lock().unwrap()[start as usize..end as usize].fill(0);
                Ok(())
            }
            // A punched hole reads as zeros and costs no memory.
            Store::File { file, .. } => nix::fcntl::fallocate(
                file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                start as i64,
                (end - start) as i64,
            )
            .map_err(std::io::Error::from),
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size) = if ino == ROOT {
            (FileType::Directory, 0o755, 0)
        } else {
            (FileType::RegularFile, 0o644, self.size())
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for ImageFs {
    fn lookup(&self, _req: &fuser::Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == "disk.img" {
            reply.entry(&TTL, &self.attr(IMAGE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: ReplyAttr,
    ) {
        match ino.0 {
            ROOT | IMAGE => reply.attr(&TTL, &self.attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &fuser::Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.read_at(offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if offset + bytes.len() as u64 > self.size() {
            return reply.error(Errno::from_i32(libc::EFBIG));
        }
        match self.write_at(offset, bytes) {
            Ok(()) => reply.written(bytes.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &fuser::Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode & (PUNCH_HOLE | ZERO_RANGE) == 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match self.zero(offset, length) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// The errno of a failed file operation, EIO if it has none.
fn errno(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}
