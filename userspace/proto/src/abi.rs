//! The FUSE kernel ABI structures fuse-blk uses, laid out exactly as in
//! `include/uapi/linux/fuse.h`. All fields are native-endian, as on the
//! kernel channel; the structures carry no padding the kernel does not have.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Major version of the FUSE protocol; a different major cannot be spoken.
pub const KERNEL_VERSION: u32 = 7;
/// Highest minor version this crate speaks. Replies are laid out for it; a
/// kernel offering less gets its own minor echoed back.
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// Oldest minor version accepted: 7.23 fixed the 64-byte `fuse_init_out`
/// and 7.9 the 40-byte `fuse_write_in`/`fuse_read_in` this crate assumes.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 23;

/// Node id of the root directory of a FUSE filesystem.
pub const ROOT_ID: u64 = 1;

/// FUSE opcodes (`enum fuse_opcode`).
pub mod opcode {
    /// FUSE_LOOKUP: find a name in a directory; answered with `EntryOut`.
    pub const LOOKUP: u32 = 1;
    /// FUSE_FORGET: the kernel drops `nlookup` references to a node; no reply.
    pub const FORGET: u32 = 2;
    /// FUSE_GETATTR: a node's attributes; answered with `AttrOut`.
    pub const GETATTR: u32 = 3;
    /// FUSE_SETATTR: change the attributes `SetattrIn.valid` names (truncate is
    /// one).
    pub const SETATTR: u32 = 4;
    /// FUSE_READLINK: a symlink's target.
    pub const READLINK: u32 = 5;
    /// FUSE_SYMLINK: create a symlink.
    pub const SYMLINK: u32 = 6;
    /// FUSE_MKNOD: create a device node, FIFO or socket.
    pub const MKNOD: u32 = 8;
    /// FUSE_MKDIR: create a directory.
    pub const MKDIR: u32 = 9;
    /// FUSE_UNLINK: remove a name that is not a directory.
    pub const UNLINK: u32 = 10;
    /// FUSE_RMDIR: remove a directory.
    pub const RMDIR: u32 = 11;
    /// FUSE_RENAME: move a name (without `renameat2` flags).
    pub const RENAME: u32 = 12;
    /// FUSE_LINK: create a hard link.
    pub const LINK: u32 = 13;
    /// FUSE_OPEN: open a file; `OpenIn` in, `OpenOut` back.
    pub const OPEN: u32 = 14;
    /// FUSE_READ: read from an open file; `ReadIn` in, the data back.
    pub const READ: u32 = 15;
    /// FUSE_WRITE: write to an open file; `WriteIn` and the data in, `WriteOut`
    /// back.
    pub const WRITE: u32 = 16;
    /// FUSE_STATFS: the filesystem's `statfs(2)`; answered with `StatfsOut`.
    pub const STATFS: u32 = 17;
    /// FUSE_RELEASE: the last reference to an open file is gone; `ReleaseIn`.
    pub const RELEASE: u32 = 18;
    /// FUSE_FSYNC: make an open file's data (and metadata) durable; `FsyncIn`.
    pub const FSYNC: u32 = 20;
    /// FUSE_SETXATTR: set an extended attribute.
    pub const SETXATTR: u32 = 21;
    /// FUSE_GETXATTR: read an extended attribute.
    pub const GETXATTR: u32 = 22;
    /// FUSE_LISTXATTR: list extended attribute names.
    pub const LISTXATTR: u32 = 23;
    /// FUSE_REMOVEXATTR: remove an extended attribute.
    pub const REMOVEXATTR: u32 = 24;
    /// FUSE_FLUSH: a file descriptor of an open file is closed; `FlushIn`.
    pub const FLUSH: u32 = 25;
    /// FUSE_INIT: the handshake, the first request on a FUSE channel;
    /// `InitIn`/`InitOut`.
    pub const INIT: u32 = 26;
    /// FUSE_OPENDIR: open a directory; `OpenIn`/`OpenOut`.
    pub const OPENDIR: u32 = 27;
    /// FUSE_READDIR: list a directory; `ReadIn` in, `DirentHeader` records
    /// back.
    pub const READDIR: u32 = 28;
    /// FUSE_RELEASEDIR: the last reference to an open directory is gone.
    pub const RELEASEDIR: u32 = 29;
    /// FUSE_FSYNCDIR: make a directory durable; `FsyncIn`.
    pub const FSYNCDIR: u32 = 30;
    /// FUSE_GETLK: test for a POSIX lock.
    pub const GETLK: u32 = 31;
    /// FUSE_SETLK: take or release a POSIX lock, without waiting.
    pub const SETLK: u32 = 32;
    /// FUSE_SETLKW: take a POSIX lock, waiting for it.
    pub const SETLKW: u32 = 33;
    /// FUSE_ACCESS: `access(2)` permission check; `AccessIn`.
    pub const ACCESS: u32 = 34;
    /// FUSE_CREATE: create and open a file in one request.
    pub const CREATE: u32 = 35;
    /// FUSE_INTERRUPT: the caller of an earlier request got a signal;
    /// `InterruptIn`, no reply.
    pub const INTERRUPT: u32 = 36;
    /// FUSE_BMAP: map a file block to a device block (fuseblk filesystems).
    pub const BMAP: u32 = 37;
    /// FUSE_DESTROY: the filesystem is being unmounted; the last request.
    pub const DESTROY: u32 = 38;
    /// FUSE_IOCTL: an `ioctl(2)` on an open file (CUSE devices too).
    pub const IOCTL: u32 = 39;
    /// FUSE_POLL: `poll(2)` readiness of an open file; `PollIn`/`PollOut`.
    pub const POLL: u32 = 40;
    /// FUSE_NOTIFY_REPLY: the kernel's answer to a retrieve notification.
    pub const NOTIFY_REPLY: u32 = 41;
    /// FUSE_BATCH_FORGET: several FORGETs in one message; `BatchForgetIn`, no
    /// reply.
    pub const BATCH_FORGET: u32 = 42;
    /// FUSE_FALLOCATE: `fallocate(2)` on an open file; `FallocateIn`, mode bits
    /// in [`falloc`](super::falloc).
    pub const FALLOCATE: u32 = 43;
    /// FUSE_READDIRPLUS: list a directory with each entry's attributes.
    pub const READDIRPLUS: u32 = 44;
    /// FUSE_RENAME2: move a name with `renameat2(2)` flags.
    pub const RENAME2: u32 = 45;
    /// FUSE_LSEEK: `SEEK_DATA`/`SEEK_HOLE` on an open file.
    pub const LSEEK: u32 = 46;
    /// FUSE_COPY_FILE_RANGE: copy between two open files without a round trip
    /// through the caller.
    pub const COPY_FILE_RANGE: u32 = 47;
    /// FUSE_SYNCFS: `syncfs(2)` on the whole filesystem.
    pub const SYNCFS: u32 = 50;
    /// FUSE_TMPFILE: create an unnamed file (`O_TMPFILE`).
    pub const TMPFILE: u32 = 51;
    /// FUSE_STATX: a node's attributes in `statx(2)` form.
    pub const STATX: u32 = 52;
    /// CUSE's handshake, the first message on `/dev/cuse`.
    pub const CUSE_INIT: u32 = 4096;
}

/// `fuse_init_in.flags` / `fuse_init_out.flags` bits (the low 32 bits).
pub mod init_flags {
    /// FUSE_ASYNC_READ: the kernel may send several reads of one file at once.
    pub const ASYNC_READ: u32 = 1 << 0;
    /// FUSE_BIG_WRITES: writes may be larger than a page (up to `max_write`).
    pub const BIG_WRITES: u32 = 1 << 5;
    /// FUSE_ASYNC_DIO: direct I/O is split into requests sent in parallel.
    pub const ASYNC_DIO: u32 = 1 << 15;
    /// FUSE_WRITEBACK_CACHE: the kernel caches writes and sends them later.
    pub const WRITEBACK_CACHE: u32 = 1 << 16;
    /// FUSE_PARALLEL_DIROPS: lookups and readdirs of one directory may run at
    /// once.
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    /// FUSE_MAX_PAGES: `fuse_init_out.max_pages` is set and honoured.
    pub const MAX_PAGES: u32 = 1 << 22;
    /// FUSE_INIT_EXT: `flags2` carries the high 32 flag bits.
    pub const INIT_EXT: u32 = 1 << 30;
}

/// `fuse_init_in.flags2` / `fuse_init_out.flags2` bits (the high 32 bits of
/// the 64-bit flags, valid with `INIT_EXT`).
pub mod init_flags2 {
    /// FUSE_OVER_IO_URING (bit 41 of the 64-bit flags).
    pub const OVER_IO_URING: u32 = 1 << (41 - 32);
    /// FUSE_PASSTHROUGH (bit 37): OPEN may name a backing file the kernel
    /// reads and writes itself.
    pub const PASSTHROUGH: u32 = 1 << (37 - 32);
}

/// `fuse_open_out.open_flags` bits.
pub mod fopen {
    /// FOPEN_DIRECT_IO: bypass the page cache for this open file.
    pub const DIRECT_IO: u32 = 1 << 0;
    /// FOPEN_KEEP_CACHE: do not invalidate cached data on open.
    pub const KEEP_CACHE: u32 = 1 << 1;
    /// FOPEN_NONSEEKABLE: the file is not seekable.
    pub const NONSEEKABLE: u32 = 1 << 2;
    /// FOPEN_NOFLUSH: do not send FLUSH on `close(2)`.
    pub const NOFLUSH: u32 = 1 << 5;
    /// FOPEN_PARALLEL_DIRECT_WRITES: direct writes to this file may run at once
    /// (no inode lock).
    pub const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
    /// Reads and writes of this open file go to `fuse_open_out.backing_id`.
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    /// FATTR_MODE: `SetattrIn.mode` is valid.
    pub const MODE: u32 = 1 << 0;
    /// FATTR_UID: `SetattrIn.uid` is valid.
    pub const UID: u32 = 1 << 1;
    /// FATTR_GID: `SetattrIn.gid` is valid.
    pub const GID: u32 = 1 << 2;
    /// FATTR_SIZE: `SetattrIn.size` is valid (truncate or extend).
    pub const SIZE: u32 = 1 << 3;
    /// FATTR_ATIME: `SetattrIn.atime`/`atimensec` are valid.
    pub const ATIME: u32 = 1 << 4;
    /// FATTR_MTIME: `SetattrIn.mtime`/`mtimensec` are valid.
    pub const MTIME: u32 = 1 << 5;
    /// FATTR_FH: `SetattrIn.fh` names the open file the change came through.
    pub const FH: u32 = 1 << 6;
    /// FATTR_ATIME_NOW: set atime to the current time.
    pub const ATIME_NOW: u32 = 1 << 7;
    /// FATTR_MTIME_NOW: set mtime to the current time.
    pub const MTIME_NOW: u32 = 1 << 8;
    /// FATTR_LOCKOWNER: `SetattrIn.lock_owner` is valid.
    pub const LOCKOWNER: u32 = 1 << 9;
    /// FATTR_CTIME: `SetattrIn.ctime`/`ctimensec` are valid.
    pub const CTIME: u32 = 1 << 10;
    /// FATTR_KILL_SUIDGID: clear the setuid/setgid bits with this change
    /// (FUSE_HANDLE_KILLPRIV_V2).
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_write_in.write_flags` bits.
pub mod write_flags {
    /// FUSE_WRITE_CACHE: a delayed write from the page cache, not from a
    /// caller.
    pub const CACHE: u32 = 1 << 0;
    /// FUSE_WRITE_LOCKOWNER: `WriteIn.lock_owner` is valid.
    pub const LOCKOWNER: u32 = 1 << 1;
    /// FUSE_WRITE_KILL_SUIDGID: clear the setuid/setgid bits.
    pub const KILL_SUIDGID: u32 = 1 << 2;
}

/// `fuse_fsync_in.fsync_flags` bits.
pub mod fsync_flags {
    /// FUSE_FSYNC_FDATASYNC: only the data need be durable (`fdatasync(2)`),
    /// not the metadata.
    pub const FDATASYNC: u32 = 1 << 0;
}

/// `fallocate(2)` mode bits as they travel in `fuse_fallocate_in.mode`.
pub mod falloc {
    /// FALLOC_FL_KEEP_SIZE: do not change the file size.
    pub const KEEP_SIZE: u32 = 0x01;
    /// FALLOC_FL_PUNCH_HOLE: deallocate the range (always with `KEEP_SIZE`); it
    /// then reads as zeros.
    pub const PUNCH_HOLE: u32 = 0x02;
    /// FALLOC_FL_ZERO_RANGE: make the range read as zeros, keeping it
    /// allocated.
    pub const ZERO_RANGE: u32 = 0x10;
}

/// `struct fuse_in_header`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct InHeader {
    /// Length of the whole request in bytes, this header included.
    pub len: u32,
    /// What the request asks, one of [`opcode`].
    pub opcode: u32,
    /// The request's id; the reply carries it back. 0 for none expected.
    pub unique: u64,
    /// The node (inode) the request is about; [`ROOT_ID`] is the root.
    pub nodeid: u64,
    /// User id of the calling process.
    pub uid: u32,
    /// Group id of the calling process.
    pub gid: u32,
    /// Id of the calling process (0 for requests the kernel makes itself).
    pub pid: u32,
    /// Length of the request extensions after the arguments, in 8-byte units
    /// (7.38+).
    pub total_extlen: u16,
    /// Zero.
    pub padding: u16,
}

/// `struct fuse_out_header`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct OutHeader {
    /// Length of the whole reply in bytes, this header included.
    pub len: u32,
    /// 0, or a negative errno; a notification's code (see [`notify`]) when
    /// `unique` is 0.
    pub error: i32,
    /// The `unique` of the request this answers; 0 for a notification.
    pub unique: u64,
}

/// `struct fuse_init_in`, the 7.36+ layout. Older kernels send only the
/// first four fields; the parser zero-fills the rest.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct InitIn {
    /// Kernel's protocol major version.
    pub major: u32,
    /// Kernel's protocol minor version.
    pub minor: u32,
    /// Largest readahead the kernel will do, in bytes.
    pub max_readahead: u32,
    /// Capabilities the kernel offers, the low 32 bits ([`init_flags`]).
    pub flags: u32,
    /// The high 32 capability bits, valid with `INIT_EXT` ([`init_flags2`]).
    pub flags2: u32,
    /// Reserved, zero.
    pub unused: [u32; 11],
}

/// `struct fuse_init_out` (64 bytes since 7.23).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct InitOut {
    /// Daemon's protocol major version ([`KERNEL_VERSION`]).
    pub major: u32,
    /// Daemon's protocol minor version, at most the kernel's.
    pub minor: u32,
    /// Readahead the daemon wants, in bytes, at most the kernel's.
    pub max_readahead: u32,
    /// Capabilities the daemon takes of those offered, low 32 bits.
    pub flags: u32,
    /// Most background (asynchronous) requests the kernel keeps outstanding.
    pub max_background: u16,
    /// Outstanding background requests at which the kernel reports congestion.
    pub congestion_threshold: u16,
    /// Largest WRITE payload the daemon accepts, in bytes.
    pub max_write: u32,
    /// Timestamp granularity in nanoseconds (1 = full resolution).
    pub time_gran: u32,
    /// Largest request in pages, with `MAX_PAGES`.
    pub max_pages: u16,
    /// log2 of the DAX mapping alignment in bytes; unused here.
    pub map_alignment: u16,
    /// The high 32 capability bits the daemon takes, with `INIT_EXT`.
    pub flags2: u32,
    /// How many filesystems a passthrough backing file may be stacked on
    /// (7.40+).
    pub max_stack_depth: u32,
    /// Reserved, zero.
    pub unused: [u32; 6],
}

/// `struct fuse_attr`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// File size in bytes.
    pub size: u64,
    /// Space used, in 512-byte units.
    pub blocks: u64,
    /// Last access time, seconds since the epoch.
    pub atime: u64,
    /// Last modification time, seconds since the epoch.
    pub mtime: u64,
    /// Last status change time, seconds since the epoch.
    pub ctime: u64,
    /// Nanoseconds part of `atime`.
    pub atimensec: u32,
    /// Nanoseconds part of `mtime`.
    pub mtimensec: u32,
    /// Nanoseconds part of `ctime`.
    pub ctimensec: u32,
    /// File type and permission bits, as in `st_mode`.
    pub mode: u32,
    /// Number of hard links.
    pub nlink: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Device number, for device nodes.
    pub rdev: u32,
    /// Preferred I/O size in bytes (`st_blksize`).
    pub blksize: u32,
    /// `FUSE_ATTR_*` bits (submount root, DAX); zero here.
    pub flags: u32,
}

/// `struct fuse_entry_out`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct EntryOut {
    /// Node id the kernel uses for this name from now on.
    pub nodeid: u64,
    /// Inode generation; (nodeid, generation) is unique for the filesystem's
    /// life.
    pub generation: u64,
    /// How long the kernel may cache the name, in seconds.
    pub entry_valid: u64,
    /// How long the kernel may cache the attributes, in seconds.
    pub attr_valid: u64,
    /// Nanoseconds part of `entry_valid`.
    pub entry_valid_nsec: u32,
    /// Nanoseconds part of `attr_valid`.
    pub attr_valid_nsec: u32,
    /// The node's attributes.
    pub attr: Attr,
}

/// `struct fuse_attr_out`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct AttrOut {
    /// How long the kernel may cache the attributes, in seconds.
    pub attr_valid: u64,
    /// Nanoseconds part of `attr_valid`.
    pub attr_valid_nsec: u32,
    /// Padding.
    pub dummy: u32,
    /// The node's attributes.
    pub attr: Attr,
}

/// `struct fuse_getattr_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct GetattrIn {
    /// FUSE_GETATTR_FH (bit 0): `fh` is valid.
    pub getattr_flags: u32,
    /// Padding.
    pub dummy: u32,
    /// The open file the request came through, with FUSE_GETATTR_FH.
    pub fh: u64,
}

/// `struct fuse_setattr_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct SetattrIn {
    /// Which of the fields below to apply ([`fattr`] bits).
    pub valid: u32,
    /// Padding.
    pub padding: u32,
    /// Open file the change came through, with `fattr::FH`.
    pub fh: u64,
    /// New file size in bytes, with `fattr::SIZE`.
    pub size: u64,
    /// Lock owner of the caller, with `fattr::LOCKOWNER`.
    pub lock_owner: u64,
    /// New access time, seconds since the epoch.
    pub atime: u64,
    /// New modification time, seconds since the epoch.
    pub mtime: u64,
    /// New status change time, seconds since the epoch.
    pub ctime: u64,
    /// Nanoseconds part of `atime`.
    pub atimensec: u32,
    /// Nanoseconds part of `mtime`.
    pub mtimensec: u32,
    /// Nanoseconds part of `ctime`.
    pub ctimensec: u32,
    /// New file mode, with `fattr::MODE`.
    pub mode: u32,
    /// Reserved.
    pub unused4: u32,
    /// New owner, with `fattr::UID`.
    pub uid: u32,
    /// New group, with `fattr::GID`.
    pub gid: u32,
    /// Reserved.
    pub unused5: u32,
}

/// `struct fuse_open_in` (also OPENDIR).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct OpenIn {
    /// The `open(2)` flags (`O_RDWR`, `O_DIRECT`...).
    pub flags: u32,
    /// FUSE_OPEN_KILL_SUIDGID (bit 0) or zero.
    pub open_flags: u32,
}

/// `struct fuse_open_out`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct OpenOut {
    /// File handle the daemon picks; the kernel sends it back with every
    /// request on this open file.
    pub fh: u64,
    /// [`fopen`] bits for this open file.
    pub open_flags: u32,
    /// Backing file registered with the kernel, with `fopen::PASSTHROUGH`; else
    /// 0.
    pub backing_id: i32,
}

/// `struct fuse_release_in` (also RELEASEDIR).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ReleaseIn {
    /// The handle `OpenOut.fh` gave.
    pub fh: u64,
    /// The `open(2)` flags of the file.
    pub flags: u32,
    /// FUSE_RELEASE_FLUSH (bit 0): flush before releasing.
    pub release_flags: u32,
    /// Lock owner, for releasing its locks.
    pub lock_owner: u64,
}

/// `struct fuse_flush_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct FlushIn {
    /// The handle `OpenOut.fh` gave.
    pub fh: u64,
    /// Reserved.
    pub unused: u32,
    /// Padding.
    pub padding: u32,
    /// Lock owner of the file descriptor being closed.
    pub lock_owner: u64,
}

/// `struct fuse_read_in` (also READDIR).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ReadIn {
    /// The handle `OpenOut.fh` gave.
    pub fh: u64,
    /// Byte offset in the file to read from.
    pub offset: u64,
    /// Bytes to read; a shorter reply means end of file.
    pub size: u32,
    /// FUSE_READ_LOCKOWNER (bit 1): `lock_owner` is valid.
    pub read_flags: u32,
    /// Lock owner of the caller, with FUSE_READ_LOCKOWNER.
    pub lock_owner: u64,
    /// The `open(2)` flags of the file.
    pub flags: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_write_in`; `size` bytes of data follow it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct WriteIn {
    /// The handle `OpenOut.fh` gave.
    pub fh: u64,
    /// Byte offset in the file to write at.
    pub offset: u64,
    /// Bytes of data following this header.
    pub size: u32,
    /// [`write_flags`] bits.
    pub write_flags: u32,
    /// Lock owner of the caller, with `write_flags::LOCKOWNER`.
    pub lock_owner: u64,
    /// The `open(2)` flags of the file (`O_DSYNC`/`O_SYNC` ask for a durable
    /// write).
    pub flags: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_write_out`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct WriteOut {
    /// Bytes written; less than asked is a short write.
    pub size: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_fsync_in` (also FSYNCDIR).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct FsyncIn {
    /// The handle `OpenOut.fh` gave.
    pub fh: u64,
    /// [`fsync_flags`] bits.
    pub fsync_flags: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_fallocate_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct FallocateIn {
    /// The handle `OpenOut.fh` gave.
    pub fh: u64,
    /// Start of the range, in bytes.
    pub offset: u64,
    /// Length of the range, in bytes.
    pub length: u64,
    /// [`falloc`] bits; 0 allocates the range.
    pub mode: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_interrupt_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct InterruptIn {
    /// The `unique` of the request to interrupt.
    pub unique: u64,
}

/// `struct fuse_forget_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ForgetIn {
    /// How many lookup references the kernel drops.
    pub nlookup: u64,
}

/// `struct fuse_batch_forget_in`; `count` `fuse_forget_one` follow it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct BatchForgetIn {
    /// Number of `ForgetOne` that follow.
    pub count: u32,
    /// Padding.
    pub dummy: u32,
}

/// `struct fuse_forget_one`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ForgetOne {
    /// The node whose references are dropped.
    pub nodeid: u64,
    /// How many lookup references are dropped.
    pub nlookup: u64,
}

/// `struct fuse_access_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct AccessIn {
    /// The `access(2)` mode: `R_OK`, `W_OK`, `X_OK` bits or `F_OK`.
    pub mask: u32,
    /// Padding.
    pub padding: u32,
}

/// `struct fuse_kstatfs` wrapped in `struct fuse_statfs_out`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct StatfsOut {
    /// Size of the filesystem in `frsize` units.
    pub blocks: u64,
    /// Free blocks.
    pub bfree: u64,
    /// Free blocks available to unprivileged users.
    pub bavail: u64,
    /// Number of inodes.
    pub files: u64,
    /// Free inodes.
    pub ffree: u64,
    /// Preferred I/O block size in bytes.
    pub bsize: u32,
    /// Longest file name, in bytes.
    pub namelen: u32,
    /// Fragment size in bytes, the unit of `blocks`.
    pub frsize: u32,
    /// Padding.
    pub padding: u32,
    /// Reserved.
    pub spare: [u32; 6],
}

/// `struct fuse_dirent` without its name; the name follows, padded to 8.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DirentHeader {
    /// Inode number of the entry.
    pub ino: u64,
    /// Offset the next READDIR continues from, after this entry.
    pub off: u64,
    /// Length of the name that follows, in bytes, without padding.
    pub namelen: u32,
    /// File type as in `d_type` (`DT_REG`, `DT_DIR`...).
    pub typ: u32,
}

/// `cuse_init_in.flags` / `cuse_init_out.flags` bits.
pub mod cuse_flags {
    /// CUSE_UNRESTRICTED_IOCTL: ioctls are passed on unchecked.
    pub const UNRESTRICTED_IOCTL: u32 = 1 << 0;
}

/// Largest device-info string (`DEVNAME=...`) a CUSE_INIT reply may carry.
pub const CUSE_INIT_INFO_MAX: usize = 4096;

/// `struct cuse_init_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct CuseInitIn {
    /// Kernel's protocol major version.
    pub major: u32,
    /// Kernel's protocol minor version.
    pub minor: u32,
    /// Reserved.
    pub unused: u32,
    /// [`cuse_flags`] bits the kernel offers.
    pub flags: u32,
}

/// `struct cuse_init_out`; the device info (`KEY=VALUE` strings, each
/// NUL-terminated) follows it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct CuseInitOut {
    /// Daemon's protocol major version.
    pub major: u32,
    /// Daemon's protocol minor version.
    pub minor: u32,
    /// Reserved.
    pub unused: u32,
    /// [`cuse_flags`] bits the daemon takes.
    pub flags: u32,
    /// Largest READ the daemon answers, in bytes.
    pub max_read: u32,
    /// Largest WRITE payload the daemon accepts, in bytes.
    pub max_write: u32,
    /// Major number for the character device (0: the kernel picks).
    pub dev_major: u32,
    /// Minor number for the character device.
    pub dev_minor: u32,
    /// Reserved, zero.
    pub spare: [u32; 10],
}

/// `fuse_poll_in.flags` bits.
pub mod poll_flags {
    /// The caller waits: notify `kh` when the events may have changed.
    pub const SCHEDULE_NOTIFY: u32 = 1 << 0;
}

/// `struct fuse_poll_in`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct PollIn {
    /// The handle `OpenOut.fh` gave.
    pub fh: u64,
    /// Kernel's poll handle, to name in a POLL notification.
    pub kh: u64,
    /// [`poll_flags`] bits.
    pub flags: u32,
    /// The `poll(2)` events asked for (`POLLIN`...).
    pub events: u32,
}

/// `struct fuse_poll_out`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct PollOut {
    /// The `poll(2)` events that are ready.
    pub revents: u32,
    /// Padding.
    pub padding: u32,
}

/// Notification codes (`enum fuse_notify_code`), sent in
/// `fuse_out_header.error` with `unique` 0.
pub mod notify {
    /// FUSE_NOTIFY_POLL: wake pollers of a `kh`; `NotifyPollWakeupOut` follows.
    pub const POLL: i32 = 1;
    /// FUSE_NOTIFY_INVAL_INODE: drop cached attributes/data of an inode;
    /// `NotifyInvalInodeOut` follows.
    pub const INVAL_INODE: i32 = 2;
}

/// `struct fuse_notify_inval_inode_out`: a negative `off` invalidates the
/// attributes only, not the page cache.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct NotifyInvalInodeOut {
    /// The inode (node id) to invalidate.
    pub ino: u64,
    /// Start of the cached data range to drop, in bytes; negative: attributes
    /// only.
    pub off: i64,
    /// Bytes to drop from `off`; 0: to the end of the file.
    pub len: i64,
}

/// `struct fuse_notify_poll_wakeup_out`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct NotifyPollWakeupOut {
    /// The `PollIn.kh` of the pollers to wake.
    pub kh: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// Sizes from `include/uapi/linux/fuse.h`; a wrong one would shift every
    /// field the kernel reads after it.
    #[test]
    fn structure_sizes_match_the_kernel() {
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<InitIn>(), 64);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<GetattrIn>(), 16);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(size_of::<OpenIn>(), 8);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReleaseIn>(), 24);
        assert_eq!(size_of::<FlushIn>(), 24);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<WriteOut>(), 8);
        assert_eq!(size_of::<FsyncIn>(), 16);
        assert_eq!(size_of::<FallocateIn>(), 32);
        assert_eq!(size_of::<InterruptIn>(), 8);
        assert_eq!(size_of::<BatchForgetIn>(), 8);
        assert_eq!(size_of::<ForgetOne>(), 16);
        assert_eq!(size_of::<AccessIn>(), 8);
        assert_eq!(size_of::<StatfsOut>(), 80);
        assert_eq!(size_of::<DirentHeader>(), 24);
        assert_eq!(size_of::<CuseInitIn>(), 16);
        assert_eq!(size_of::<CuseInitOut>(), 72);
        assert_eq!(size_of::<PollIn>(), 24);
        assert_eq!(size_of::<PollOut>(), 8);
        assert_eq!(size_of::<NotifyPollWakeupOut>(), 8);
        assert_eq!(size_of::<NotifyInvalInodeOut>(), 24);
    }
}
