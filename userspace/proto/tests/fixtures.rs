//! Byte-exact fixtures: every message is written out by hand, field by
//! field, from `include/uapi/linux/fuse.h`, never produced by this crate's
//! own encoder, so that a wrong layout on both sides cannot cancel out.
//!
//! The channel is native-endian; these fixtures are little-endian.
#![cfg(target_endian = "little")]

use fuse_blk_proto::abi::{self, opcode, EntryOut, InHeader, InitOut, WriteOut};
use fuse_blk_proto::client::{encode_request, parse_reply, read_struct, Reply, ReplyError};
use fuse_blk_proto::reply::{dirent_size, encode_reply, error_header, push_dirent, success_header};
use fuse_blk_proto::{parse_request, parse_request_split, Operation, ParseErrorKind, Request};
use zerocopy::IntoBytes;

/// `ENOENT` and `EIO` on Linux (the proto crate has no libc dependency).
const ENOENT: i32 = 2;
const EIO: i32 = 5;

/// The header every request fixture below shares except for len, opcode
/// and unique: nodeid 2, uid 1000, gid 100, pid 0x1234.
fn common_header(len: u32, opcode: u32, unique: u64) -> InHeader {
    InHeader {
        len,
        opcode,
        unique,
        nodeid: 2,
        uid: 1000,
        gid: 100,
        pid: 0x1234,
        total_extlen: 0,
        padding: 0,
    }
}

fn parse(bytes: &[u8]) -> Request<'_> {
    match parse_request(bytes) {
        Ok(request) => request,
        Err(e) => panic!("fixture rejected: {e} ({e:?})"),
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// INIT from a 7.36+ kernel: the full 64-byte `fuse_init_in`.
const INIT_64: &[u8] = &[
    // fuse_in_header
    0x68, 0x00, 0x00, 0x00, // len = 104 (40 + 64)
    0x1a, 0x00, 0x00, 0x00, // opcode = 26 (INIT)
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen = 0
    0x00, 0x00, // padding
    // fuse_init_in
    0x07, 0x00, 0x00, 0x00, // major = 7
    0x26, 0x00, 0x00, 0x00, // minor = 38
    0x00, 0x00, 0x02, 0x00, // max_readahead = 0x20000
    0x21, 0x00, 0x40, 0x40, // flags = ASYNC_READ|BIG_WRITES|MAX_PAGES|INIT_EXT
    0x03, 0x00, 0x00, 0x00, // flags2 = 3
    0x00, 0x00, 0x00, 0x00, // unused[0]
    0x00, 0x00, 0x00, 0x00, // unused[1]
    0x00, 0x00, 0x00, 0x00, // unused[2]
    0x00, 0x00, 0x00, 0x00, // unused[3]
    0x00, 0x00, 0x00, 0x00, // unused[4]
    0x00, 0x00, 0x00, 0x00, // unused[5]
    0x00, 0x00, 0x00, 0x00, // unused[6]
    0x00, 0x00, 0x00, 0x00, // unused[7]
    0x00, 0x00, 0x00, 0x00, // unused[8]
    0x00, 0x00, 0x00, 0x00, // unused[9]
    0x00, 0x00, 0x00, 0x00, // unused[10]
];

/// INIT from a pre-7.36 kernel: only major, minor, max_readahead, flags.
const INIT_16: &[u8] = &[
    // fuse_in_header
    0x38, 0x00, 0x00, 0x00, // len = 56 (40 + 16)
    0x1a, 0x00, 0x00, 0x00, // opcode = 26 (INIT)
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 2
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_init_in (old layout)
    0x07, 0x00, 0x00, 0x00, // major = 7
    0x1f, 0x00, 0x00, 0x00, // minor = 31
    0x00, 0x00, 0x02, 0x00, // max_readahead = 0x20000
    0x21, 0x00, 0x40, 0x00, // flags = ASYNC_READ|BIG_WRITES|MAX_PAGES
];

const READ: &[u8] = &[
    // fuse_in_header
    0x50, 0x00, 0x00, 0x00, // len = 80 (40 + 40)
    0x0f, 0x00, 0x00, 0x00, // opcode = 15 (READ)
    0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // unique = 0x1122334455667788
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_read_in
    0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 0x10
    0x00, 0x20, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, // offset = 0x1_0000_2000
    0x00, 0x10, 0x00, 0x00, // size = 4096
    0x02, 0x00, 0x00, 0x00, // read_flags = 2 (READ_LOCKOWNER)
    0x0d, 0xf0, 0xfe, 0xca, 0xef, 0xbe, 0xad, 0xde, // lock_owner = 0xdeadbeefcafef00d
    0x02, 0x80, 0x00, 0x00, // flags = O_RDWR|O_LARGEFILE
    0x00, 0x00, 0x00, 0x00, // padding
];

const WRITE: &[u8] = &[
    // fuse_in_header
    0x58, 0x00, 0x00, 0x00, // len = 88 (40 + 40 + 8)
    0x10, 0x00, 0x00, 0x00, // opcode = 16 (WRITE)
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 3
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_write_in
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 7
    0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 512
    0x08, 0x00, 0x00, 0x00, // size = 8
    0x01, 0x00, 0x00, 0x00, // write_flags = CACHE
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // lock_owner = 0
    0x02, 0x10, 0x00, 0x00, // flags = O_RDWR|O_DSYNC
    0x00, 0x00, 0x00, 0x00, // padding
    // data
    0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04,
];

const FSYNC: &[u8] = &[
    // fuse_in_header
    0x38, 0x00, 0x00, 0x00, // len = 56 (40 + 16)
    0x14, 0x00, 0x00, 0x00, // opcode = 20 (FSYNC)
    0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 4
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_fsync_in
    0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 9
    0x01, 0x00, 0x00, 0x00, // fsync_flags = FDATASYNC
    0x00, 0x00, 0x00, 0x00, // padding
];

const FLUSH: &[u8] = &[
    // fuse_in_header
    0x40, 0x00, 0x00, 0x00, // len = 64 (40 + 24)
    0x19, 0x00, 0x00, 0x00, // opcode = 25 (FLUSH)
    0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 5
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_flush_in
    0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 9
    0x00, 0x00, 0x00, 0x00, // unused
    0x00, 0x00, 0x00, 0x00, // padding
    0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // lock_owner = 0x0102030405060708
];

const FALLOCATE: &[u8] = &[
    // fuse_in_header
    0x48, 0x00, 0x00, 0x00, // len = 72 (40 + 32)
    0x2b, 0x00, 0x00, 0x00, // opcode = 43 (FALLOCATE)
    0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 6
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_fallocate_in
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 3
    0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, // offset = 1 MiB
    0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // length = 8192
    0x03, 0x00, 0x00, 0x00, // mode = PUNCH_HOLE|KEEP_SIZE
    0x00, 0x00, 0x00, 0x00, // padding
];

const DESTROY: &[u8] = &[
    // fuse_in_header only
    0x28, 0x00, 0x00, 0x00, // len = 40
    0x26, 0x00, 0x00, 0x00, // opcode = 38 (DESTROY)
    0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 7
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
];

const INTERRUPT: &[u8] = &[
    // fuse_in_header
    0x30, 0x00, 0x00, 0x00, // len = 48 (40 + 8)
    0x24, 0x00, 0x00, 0x00, // opcode = 36 (INTERRUPT)
    0x89, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // unique = 0x11..89, INT_REQ_BIT
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_interrupt_in
    0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // unique = 0x1122334455667788
];

const LOOKUP: &[u8] = &[
    // fuse_in_header
    0x2d, 0x00, 0x00, 0x00, // len = 45 (40 + 5)
    0x01, 0x00, 0x00, 0x00, // opcode = 1 (LOOKUP)
    0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 8
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // name
    b'd', b'i', b's', b'k', 0x00, // "disk\0"
];

const GETATTR: &[u8] = &[
    // fuse_in_header
    0x38, 0x00, 0x00, 0x00, // len = 56 (40 + 16)
    0x03, 0x00, 0x00, 0x00, // opcode = 3 (GETATTR)
    0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 9
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_getattr_in
    0x01, 0x00, 0x00, 0x00, // getattr_flags = GETATTR_FH
    0x00, 0x00, 0x00, 0x00, // dummy
    0x42, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 0x42
];

const SETATTR: &[u8] = &[
    // fuse_in_header
    0x80, 0x00, 0x00, 0x00, // len = 128 (40 + 88)
    0x04, 0x00, 0x00, 0x00, // opcode = 4 (SETATTR)
    0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 10
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_setattr_in
    0x48, 0x00, 0x00, 0x00, // valid = SIZE|FH
    0x00, 0x00, 0x00, 0x00, // padding
    0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 5
    0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, // size = 1 GiB
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // lock_owner
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // atime = 1
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mtime = 2
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // ctime = 3
    0x04, 0x00, 0x00, 0x00, // atimensec = 4
    0x05, 0x00, 0x00, 0x00, // mtimensec = 5
    0x06, 0x00, 0x00, 0x00, // ctimensec = 6
    0xa4, 0x81, 0x00, 0x00, // mode = 0o100644
    0x00, 0x00, 0x00, 0x00, // unused4
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x00, 0x00, 0x00, 0x00, // unused5
];

const OPEN: &[u8] = &[
    // fuse_in_header
    0x30, 0x00, 0x00, 0x00, // len = 48 (40 + 8)
    0x0e, 0x00, 0x00, 0x00, // opcode = 14 (OPEN)
    0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 11
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_open_in
    0x02, 0x80, 0x00, 0x00, // flags = O_RDWR|O_LARGEFILE
    0x00, 0x00, 0x00, 0x00, // open_flags
];

const RELEASE: &[u8] = &[
    // fuse_in_header
    0x40, 0x00, 0x00, 0x00, // len = 64 (40 + 24)
    0x12, 0x00, 0x00, 0x00, // opcode = 18 (RELEASE)
    0x0c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 12
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_release_in
    0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // fh = 5
    0x02, 0x80, 0x00, 0x00, // flags = O_RDWR|O_LARGEFILE
    0x01, 0x00, 0x00, 0x00, // release_flags = RELEASE_FLUSH
    0x77, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // lock_owner = 0x77
];

const STATFS: &[u8] = &[
    // fuse_in_header only
    0x28, 0x00, 0x00, 0x00, // len = 40
    0x11, 0x00, 0x00, 0x00, // opcode = 17 (STATFS)
    0x0d, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 13
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
];

const FORGET: &[u8] = &[
    // fuse_in_header
    0x30, 0x00, 0x00, 0x00, // len = 48 (40 + 8)
    0x02, 0x00, 0x00, 0x00, // opcode = 2 (FORGET)
    0x0e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 14
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_forget_in
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nlookup = 3
];

const BATCH_FORGET: &[u8] = &[
    // fuse_in_header
    0x50, 0x00, 0x00, 0x00, // len = 80 (40 + 8 + 2 * 16)
    0x2a, 0x00, 0x00, 0x00, // opcode = 42 (BATCH_FORGET)
    0x0f, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 15
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_batch_forget_in
    0x02, 0x00, 0x00, 0x00, // count = 2
    0x00, 0x00, 0x00, 0x00, // dummy
    // fuse_forget_one[0]
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nlookup = 1
    // fuse_forget_one[1]
    0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 3
    0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nlookup = 5
];

const ACCESS: &[u8] = &[
    // fuse_in_header
    0x30, 0x00, 0x00, 0x00, // len = 48 (40 + 8)
    0x22, 0x00, 0x00, 0x00, // opcode = 34 (ACCESS)
    0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 16
    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
    0xe8, 0x03, 0x00, 0x00, // uid = 1000
    0x64, 0x00, 0x00, 0x00, // gid = 100
    0x34, 0x12, 0x00, 0x00, // pid = 0x1234
    0x00, 0x00, // total_extlen
    0x00, 0x00, // padding
    // fuse_access_in
    0x06, 0x00, 0x00, 0x00, // mask = R_OK|W_OK
    0x00, 0x00, 0x00, 0x00, // padding
];

#[test]
fn init_new_layout() {
    let request = parse(INIT_64);
    assert_eq!(request.header, common_header(104, opcode::INIT, 1));
    assert_eq!(request.unique(), 1);
    assert!(request.expects_reply());
    assert_eq!(
        request.operation,
        Operation::Init(abi::InitIn {
            major: 7,
            minor: 38,
            max_readahead: 0x20000,
            flags: 0x4040_0021,
            flags2: 3,
            unused: [0; 11],
        })
    );
}

#[test]
fn init_old_layout_is_zero_filled() {
    let request = parse(INIT_16);
    assert_eq!(request.header, common_header(56, opcode::INIT, 2));
    assert_eq!(
        request.operation,
        Operation::Init(abi::InitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x20000,
            flags: 0x0040_0021,
            flags2: 0,
            unused: [0; 11],
        })
    );
}

#[test]
fn init_longer_than_the_structure_is_accepted() {
    // A future kernel with a longer fuse_init_in: the known prefix is read.
    let mut bytes = INIT_64.to_vec();
    bytes.extend_from_slice(&[0xff; 8]);
    bytes[0] = 0x70; // len = 112
    let request = parse(&bytes);
    let Operation::Init(init) = request.operation else {
        panic!("not INIT: {request:?}");
    };
    assert_eq!((init.major, init.minor, init.flags2), (7, 38, 3));
}

#[test]
fn read() {
    let request = parse(READ);
    assert_eq!(
        request.header,
        common_header(80, opcode::READ, 0x1122_3344_5566_7788)
    );
    assert_eq!(
        request.operation,
        Operation::Read(abi::ReadIn {
            fh: 0x10,
            offset: 0x1_0000_2000,
            size: 4096,
            read_flags: 2,
            lock_owner: 0xdead_beef_cafe_f00d,
            flags: 0x8002,
            padding: 0,
        })
    );
}

#[test]
fn write_with_data() {
    let request = parse(WRITE);
    assert_eq!(request.header, common_header(88, opcode::WRITE, 3));
    let Operation::Write { arg, data } = request.operation else {
        panic!("not WRITE: {request:?}");
    };
    assert_eq!(
        arg,
        abi::WriteIn {
            fh: 7,
            offset: 512,
            size: 8,
            write_flags: abi::write_flags::CACHE,
            lock_owner: 0,
            flags: 0x1002,
            padding: 0,
        }
    );
    assert_eq!(data, &[0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04]);
    // The data is borrowed from the message, not copied.
    assert_eq!(data.as_ptr(), WRITE[80..].as_ptr());
}

/// The WRITE fixture as an io_uring entry holds it: header and argument in
/// a header buffer, data at the start of a payload buffer, both with room
/// to spare that is not part of the message.
#[test]
fn write_split_across_header_and_payload_buffers() {
    let mut head = [0xaau8; 128];
    head[..80].copy_from_slice(&WRITE[..80]);
    let mut payload = [0x55u8; 4096];
    payload[..8].copy_from_slice(&WRITE[80..]);
    let split = parse_request_split(&head, &payload).unwrap();
    let whole = parse(WRITE);
    assert_eq!(split.header, whole.header);
    let (Operation::Write { arg, data }, Operation::Write { arg: want, .. }) =
        (split.operation, whole.operation)
    else {
        panic!("not WRITE: {split:?}");
    };
    assert_eq!(arg, want);
    assert_eq!(data, &WRITE[80..]);
    assert_eq!(data.as_ptr(), payload.as_ptr());

    // A payload buffer shorter than the data the header announces.
    let err = parse_request_split(&head, &payload[..7]).unwrap_err();
    assert!(
        matches!(err.kind, ParseErrorKind::LengthMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn split_messages_without_data_lie_in_the_header_buffer() {
    let mut head = [0u8; 128];
    head[..READ.len()].copy_from_slice(READ);
    let request = parse_request_split(&head, &[0xff; 64]).unwrap();
    assert_eq!(request, parse(READ));
    // A header buffer too short for the length the header announces.
    let err = parse_request_split(&READ[..READ.len() - 1], &[]).unwrap_err();
    assert!(
        matches!(err.kind, ParseErrorKind::LengthMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn fsync() {
    let request = parse(FSYNC);
    assert_eq!(request.header, common_header(56, opcode::FSYNC, 4));
    assert_eq!(
        request.operation,
        Operation::Fsync(abi::FsyncIn {
            fh: 9,
            fsync_flags: abi::fsync_flags::FDATASYNC,
            padding: 0,
        })
    );
}

#[test]
fn flush() {
    let request = parse(FLUSH);
    assert_eq!(request.header, common_header(64, opcode::FLUSH, 5));
    assert_eq!(
        request.operation,
        Operation::Flush(abi::FlushIn {
            fh: 9,
            unused: 0,
            padding: 0,
            lock_owner: 0x0102_0304_0506_0708,
        })
    );
}

#[test]
fn fallocate() {
    let request = parse(FALLOCATE);
    assert_eq!(request.header, common_header(72, opcode::FALLOCATE, 6));
    assert_eq!(
        request.operation,
        Operation::Fallocate(abi::FallocateIn {
            fh: 3,
            offset: 1 << 20,
            length: 8192,
            mode: abi::falloc::PUNCH_HOLE | abi::falloc::KEEP_SIZE,
            padding: 0,
        })
    );
}

#[test]
fn destroy() {
    let request = parse(DESTROY);
    assert_eq!(request.header, common_header(40, opcode::DESTROY, 7));
    assert_eq!(request.operation, Operation::Destroy);
    assert!(request.expects_reply());
}

#[test]
fn interrupt() {
    let request = parse(INTERRUPT);
    assert_eq!(
        request.header,
        common_header(48, opcode::INTERRUPT, 0x1122_3344_5566_7789)
    );
    assert_eq!(
        request.operation,
        Operation::Interrupt(abi::InterruptIn {
            unique: 0x1122_3344_5566_7788
        })
    );
}

#[test]
fn lookup() {
    let request = parse(LOOKUP);
    assert_eq!(request.header, common_header(45, opcode::LOOKUP, 8));
    assert_eq!(request.operation, Operation::Lookup { name: b"disk" });
}

#[test]
fn getattr() {
    let request = parse(GETATTR);
    assert_eq!(request.header, common_header(56, opcode::GETATTR, 9));
    assert_eq!(
        request.operation,
        Operation::Getattr(abi::GetattrIn {
            getattr_flags: 1,
            dummy: 0,
            fh: 0x42,
        })
    );
}

#[test]
fn setattr() {
    let request = parse(SETATTR);
    assert_eq!(request.header, common_header(128, opcode::SETATTR, 10));
    assert_eq!(
        request.operation,
        Operation::Setattr(abi::SetattrIn {
            valid: abi::fattr::SIZE | abi::fattr::FH,
            padding: 0,
            fh: 5,
            size: 1 << 30,
            lock_owner: 0,
            atime: 1,
            mtime: 2,
            ctime: 3,
            atimensec: 4,
            mtimensec: 5,
            ctimensec: 6,
            mode: 0o100644,
            unused4: 0,
            uid: 1000,
            gid: 100,
            unused5: 0,
        })
    );
}

#[test]
fn open() {
    let request = parse(OPEN);
    assert_eq!(request.header, common_header(48, opcode::OPEN, 11));
    assert_eq!(
        request.operation,
        Operation::Open(abi::OpenIn {
            flags: 0x8002,
            open_flags: 0,
        })
    );
}

#[test]
fn release() {
    let request = parse(RELEASE);
    assert_eq!(request.header, common_header(64, opcode::RELEASE, 12));
    assert_eq!(
        request.operation,
        Operation::Release(abi::ReleaseIn {
            fh: 5,
            flags: 0x8002,
            release_flags: 1,
            lock_owner: 0x77,
        })
    );
}

#[test]
fn statfs() {
    let request = parse(STATFS);
    assert_eq!(request.header, common_header(40, opcode::STATFS, 13));
    assert_eq!(request.operation, Operation::Statfs);
}

#[test]
fn forget_expects_no_reply() {
    let request = parse(FORGET);
    assert_eq!(request.header, common_header(48, opcode::FORGET, 14));
    assert_eq!(
        request.operation,
        Operation::Forget(abi::ForgetIn { nlookup: 3 })
    );
    assert!(!request.expects_reply());
}

#[test]
fn batch_forget_expects_no_reply() {
    let request = parse(BATCH_FORGET);
    assert_eq!(request.header, common_header(80, opcode::BATCH_FORGET, 15));
    assert_eq!(request.operation, Operation::BatchForget { count: 2 });
    assert!(!request.expects_reply());
}

#[test]
fn access() {
    let request = parse(ACCESS);
    assert_eq!(request.header, common_header(48, opcode::ACCESS, 16));
    assert_eq!(
        request.operation,
        Operation::Access(abi::AccessIn {
            mask: 6,
            padding: 0,
        })
    );
}

#[test]
fn every_fixture_declares_its_own_length() {
    for fixture in [
        INIT_64,
        INIT_16,
        READ,
        WRITE,
        FSYNC,
        FLUSH,
        FALLOCATE,
        DESTROY,
        INTERRUPT,
        LOOKUP,
        GETATTR,
        SETATTR,
        OPEN,
        RELEASE,
        STATFS,
        FORGET,
        BATCH_FORGET,
        ACCESS,
    ] {
        let len = u32::from_le_bytes(fixture[..4].try_into().unwrap());
        assert_eq!(len as usize, fixture.len());
        assert_eq!(parse(fixture).header.len as usize, fixture.len());
    }
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

#[test]
fn success_header_bytes() {
    let header = success_header(0x1122_3344_5566_7788, 64);
    assert_eq!(
        header.as_bytes(),
        &[
            0x50, 0x00, 0x00, 0x00, // len = 80 (16 + 64)
            0x00, 0x00, 0x00, 0x00, // error = 0
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // unique
        ]
    );
    assert_eq!(
        success_header(9, 0).as_bytes(),
        &[
            0x10, 0x00, 0x00, 0x00, // len = 16
            0x00, 0x00, 0x00, 0x00, // error = 0
            0x09, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 9
        ]
    );
}

#[test]
fn init_out_reply_bytes() {
    let out = InitOut {
        major: 7,
        minor: 31,
        max_readahead: 0x20000,
        flags: 0x0040_0021,
        max_background: 128,
        congestion_threshold: 96,
        max_write: 1 << 20,
        time_gran: 1,
        max_pages: 256,
        map_alignment: 0,
        flags2: 0,
        max_stack_depth: 0,
        unused: [0; 6],
    };
    let expected: &[u8] = &[
        // fuse_out_header
        0x50, 0x00, 0x00, 0x00, // len = 80 (16 + 64)
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
        // fuse_init_out
        0x07, 0x00, 0x00, 0x00, // major = 7
        0x1f, 0x00, 0x00, 0x00, // minor = 31
        0x00, 0x00, 0x02, 0x00, // max_readahead = 0x20000
        0x21, 0x00, 0x40, 0x00, // flags
        0x80, 0x00, // max_background = 128
        0x60, 0x00, // congestion_threshold = 96
        0x00, 0x00, 0x10, 0x00, // max_write = 1 MiB
        0x01, 0x00, 0x00, 0x00, // time_gran = 1
        0x00, 0x01, // max_pages = 256
        0x00, 0x00, // map_alignment
        0x00, 0x00, 0x00, 0x00, // flags2
        0x00, 0x00, 0x00, 0x00, // max_stack_depth
        0x00, 0x00, 0x00, 0x00, // unused[0]
        0x00, 0x00, 0x00, 0x00, // unused[1]
        0x00, 0x00, 0x00, 0x00, // unused[2]
        0x00, 0x00, 0x00, 0x00, // unused[3]
        0x00, 0x00, 0x00, 0x00, // unused[4]
        0x00, 0x00, 0x00, 0x00, // unused[5]
    ];
    assert_eq!(encode_reply(1, &[out.as_bytes()]), expected);
    // The same with the header encoded separately, as a gathered write does.
    let mut gathered = success_header(1, 64).as_bytes().to_vec();
    gathered.extend_from_slice(out.as_bytes());
    assert_eq!(gathered, expected);
}

#[test]
fn write_out_reply_bytes() {
    let out = WriteOut {
        size: 4096,
        padding: 0,
    };
    let expected: &[u8] = &[
        // fuse_out_header
        0x18, 0x00, 0x00, 0x00, // len = 24 (16 + 8)
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 3
        // fuse_write_out
        0x00, 0x10, 0x00, 0x00, // size = 4096
        0x00, 0x00, 0x00, 0x00, // padding
    ];
    assert_eq!(encode_reply(3, &[out.as_bytes()]), expected);
}

#[test]
fn entry_out_reply_bytes() {
    let out = EntryOut {
        nodeid: 2,
        generation: 0,
        entry_valid: 1,
        attr_valid: 1,
        entry_valid_nsec: 0,
        attr_valid_nsec: 0,
        attr: abi::Attr {
            ino: 2,
            size: 1 << 30,
            blocks: 0x20_0000,
            atime: 0,
            mtime: 0,
            ctime: 0,
            atimensec: 0,
            mtimensec: 0,
            ctimensec: 0,
            mode: 0o100644,
            nlink: 1,
            uid: 1000,
            gid: 100,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        },
    };
    let expected: &[u8] = &[
        // fuse_out_header
        0x90, 0x00, 0x00, 0x00, // len = 144 (16 + 128)
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 8
        // fuse_entry_out
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 2
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // generation = 0
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // entry_valid = 1
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // attr_valid = 1
        0x00, 0x00, 0x00, 0x00, // entry_valid_nsec
        0x00, 0x00, 0x00, 0x00, // attr_valid_nsec
        // fuse_attr
        0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // ino = 2
        0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, // size = 1 GiB
        0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, // blocks = 0x200000
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // atime
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mtime
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // ctime
        0x00, 0x00, 0x00, 0x00, // atimensec
        0x00, 0x00, 0x00, 0x00, // mtimensec
        0x00, 0x00, 0x00, 0x00, // ctimensec
        0xa4, 0x81, 0x00, 0x00, // mode = 0o100644
        0x01, 0x00, 0x00, 0x00, // nlink = 1
        0xe8, 0x03, 0x00, 0x00, // uid = 1000
        0x64, 0x00, 0x00, 0x00, // gid = 100
        0x00, 0x00, 0x00, 0x00, // rdev
        0x00, 0x10, 0x00, 0x00, // blksize = 4096
        0x00, 0x00, 0x00, 0x00, // flags
    ];
    assert_eq!(encode_reply(8, &[out.as_bytes()]), expected);
}

#[test]
fn encode_reply_concatenates_parts() {
    let expected: &[u8] = &[
        0x15, 0x00, 0x00, 0x00, // len = 21 (16 + 2 + 0 + 3)
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 42
        0x01, 0x02, 0x03, 0x04, 0x05,
    ];
    assert_eq!(encode_reply(42, &[&[1, 2], &[], &[3, 4, 5]]), expected);
    assert_eq!(
        encode_reply(42, &[]),
        &[
            0x10, 0x00, 0x00, 0x00, // len = 16
            0x00, 0x00, 0x00, 0x00, // error = 0
            0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 42
        ]
    );
}

#[test]
fn error_header_enoent() {
    let header = error_header(0x1122_3344_5566_7788, ENOENT);
    assert_eq!(
        header.as_bytes(),
        &[
            0x10, 0x00, 0x00, 0x00, // len = 16
            0xfe, 0xff, 0xff, 0xff, // error = -2
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // unique
        ]
    );
    assert_eq!(header.error, -2);
}

#[test]
fn error_header_out_of_range_becomes_eio() {
    for errno in [0, -3, 512, 100_000, i32::MIN, i32::MAX, -511] {
        let header = error_header(5, errno);
        assert_eq!(header.error, -EIO, "errno {errno}");
        assert_eq!(
            header.as_bytes(),
            &[
                0x10, 0x00, 0x00, 0x00, // len = 16
                0xfb, 0xff, 0xff, 0xff, // error = -5
                0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 5
            ]
        );
    }
}

#[test]
fn error_header_range_bounds_are_kept() {
    assert_eq!(error_header(1, 1).error, -1);
    assert_eq!(error_header(1, 511).error, -511);
    assert_eq!(
        error_header(1, 511).as_bytes()[4..8],
        [0x01, 0xfe, 0xff, 0xff]
    );
}

#[test]
fn push_dirent_pads_to_eight() {
    let mut buf = Vec::new();
    assert!(push_dirent(&mut buf, 4096, 2, 1, 8, b"abc"));
    assert_eq!(
        buf,
        &[
            0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // ino = 2
            0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // off = 1
            0x03, 0x00, 0x00, 0x00, // namelen = 3
            0x08, 0x00, 0x00, 0x00, // type = DT_REG
            b'a', b'b', b'c', // name
            0x00, 0x00, 0x00, 0x00, 0x00, // padding to 32
        ]
    );
    // An 8-byte name needs no padding.
    assert!(push_dirent(&mut buf, 4096, 3, 2, 4, b"12345678"));
    assert_eq!(buf.len(), 64);
    assert_eq!(&buf[32 + 24..], b"12345678");
    // An empty name is the bare header.
    assert!(push_dirent(&mut buf, 4096, 4, 3, 4, b""));
    assert_eq!(buf.len(), 88);
    assert_eq!(dirent_size(0), 24);
    assert_eq!(dirent_size(1), 32);
    assert_eq!(dirent_size(8), 32);
    assert_eq!(dirent_size(9), 40);
}

#[test]
fn push_dirent_respects_the_limit() {
    let mut buf = Vec::new();
    // Exactly filling the limit is allowed.
    assert!(push_dirent(&mut buf, 32, 2, 1, 8, b"abc"));
    assert_eq!(buf.len(), 32);
    // One more entry does not fit and leaves the buffer untouched.
    let before = buf.clone();
    assert!(!push_dirent(&mut buf, 63, 3, 2, 8, b"def"));
    assert_eq!(buf, before);
    assert!(push_dirent(&mut buf, 64, 3, 2, 8, b"def"));
    assert_eq!(buf.len(), 64);
    // A limit smaller than one entry refuses it.
    let mut empty = Vec::new();
    assert!(!push_dirent(&mut empty, 31, 2, 1, 8, b"abc"));
    assert!(empty.is_empty());
    assert!(!push_dirent(&mut empty, 0, 2, 1, 8, b""));
}

// ---------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------

#[test]
fn encode_request_matches_hand_written_bytes() {
    // DESTROY with uid/gid/pid zero, as encode_request leaves them.
    let expected: &[u8] = &[
        0x28, 0x00, 0x00, 0x00, // len = 40
        0x26, 0x00, 0x00, 0x00, // opcode = 38 (DESTROY)
        0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 7
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // nodeid = 1
        0x00, 0x00, 0x00, 0x00, // uid
        0x00, 0x00, 0x00, 0x00, // gid
        0x00, 0x00, 0x00, 0x00, // pid
        0x00, 0x00, // total_extlen
        0x00, 0x00, // padding
    ];
    assert_eq!(
        encode_request(opcode::DESTROY, 7, abi::ROOT_ID, &[]),
        expected
    );

    // READ: the body of the READ fixture, gathered from two parts.
    let encoded = encode_request(
        opcode::READ,
        0x1122_3344_5566_7788,
        2,
        &[&READ[40..60], &READ[60..]],
    );
    assert_eq!(encoded.len(), READ.len());
    assert_eq!(encoded[..24], READ[..24]); // len, opcode, unique, nodeid
    assert_eq!(encoded[24..40], [0; 16]); // uid, gid, pid, extlen, padding
    assert_eq!(encoded[40..], READ[40..]);
}

#[test]
fn encode_request_then_parse_round_trips() {
    let arg = abi::FallocateIn {
        fh: 1,
        offset: 4096,
        length: 8192,
        mode: abi::falloc::ZERO_RANGE,
        padding: 0,
    };
    let bytes = encode_request(opcode::FALLOCATE, 99, 2, &[arg.as_bytes()]);
    let request = parse(&bytes);
    assert_eq!(request.header.opcode, opcode::FALLOCATE);
    assert_eq!(request.header.unique, 99);
    assert_eq!(request.header.nodeid, 2);
    assert_eq!(request.header.len as usize, bytes.len());
    assert_eq!(request.operation, Operation::Fallocate(arg));

    let arg = abi::WriteIn {
        offset: 512,
        size: 3,
        flags: 0x1000,
        ..Default::default()
    };
    let bytes = encode_request(opcode::WRITE, 100, 2, &[arg.as_bytes(), b"xyz"]);
    assert_eq!(
        parse(&bytes).operation,
        Operation::Write { arg, data: b"xyz" }
    );

    let bytes = encode_request(opcode::LOOKUP, 101, 1, &[b"disk\0"]);
    assert_eq!(parse(&bytes).operation, Operation::Lookup { name: b"disk" });
}

#[test]
fn parse_reply_accepts_good_replies() {
    // Success with a WriteOut payload.
    let bytes: &[u8] = &[
        0x18, 0x00, 0x00, 0x00, // len = 24
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 3
        0x00, 0x10, 0x00, 0x00, // size = 4096
        0x00, 0x00, 0x00, 0x00, // padding
    ];
    let reply = parse_reply(bytes).unwrap();
    assert_eq!(reply.unique, 3);
    let payload = reply.result.unwrap();
    assert_eq!(payload, &bytes[16..]);
    assert_eq!(
        read_struct::<WriteOut>(payload),
        Some(WriteOut {
            size: 4096,
            padding: 0
        })
    );
    assert_eq!(read_struct::<InitOut>(payload), None);

    // Success without payload.
    let bytes: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 4
    ];
    assert_eq!(
        parse_reply(bytes),
        Ok(Reply {
            unique: 4,
            result: Ok(&[])
        })
    );

    // ENOENT.
    let bytes: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0xfe, 0xff, 0xff, 0xff, // error = -2
        0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 5
    ];
    assert_eq!(
        parse_reply(bytes),
        Ok(Reply {
            unique: 5,
            result: Err(ENOENT)
        })
    );

    // -511, the largest errno the kernel accepts.
    let bytes: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0x01, 0xfe, 0xff, 0xff, // error = -511
        0x06, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 6
    ];
    assert_eq!(parse_reply(bytes).unwrap().result, Err(511));
}

#[test]
fn parse_reply_round_trips_the_encoders() {
    let bytes = encode_reply(77, &[b"abc"]);
    assert_eq!(
        parse_reply(&bytes),
        Ok(Reply {
            unique: 77,
            result: Ok(b"abc")
        })
    );
    let header = error_header(78, ENOENT);
    assert_eq!(
        parse_reply(header.as_bytes()),
        Ok(Reply {
            unique: 78,
            result: Err(ENOENT)
        })
    );
}

#[test]
fn parse_reply_rejects_bad_replies() {
    // Shorter than a header.
    let good: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
    ];
    for len in 0..16 {
        assert_eq!(
            parse_reply(&good[..len]),
            Err(ReplyError::ShortHeader),
            "{len} bytes"
        );
    }

    // Length says more than was received.
    let bytes: &[u8] = &[
        0x18, 0x00, 0x00, 0x00, // len = 24
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
        0xaa, 0xbb, 0xcc, 0xdd, // only 4 of 8 bytes
    ];
    assert_eq!(
        parse_reply(bytes),
        Err(ReplyError::LengthMismatch {
            header_len: 24,
            received: 20
        })
    );

    // Length says less than was received.
    let bytes: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0x00, 0x00, 0x00, 0x00, // error = 0
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
        0xaa, 0xbb, 0xcc, 0xdd, // 4 extra bytes
    ];
    assert_eq!(
        parse_reply(bytes),
        Err(ReplyError::LengthMismatch {
            header_len: 16,
            received: 20
        })
    );

    // An error that carries a payload.
    let bytes: &[u8] = &[
        0x14, 0x00, 0x00, 0x00, // len = 20
        0xfe, 0xff, 0xff, 0xff, // error = -2
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
        0xaa, 0xbb, 0xcc, 0xdd, // payload
    ];
    assert_eq!(parse_reply(bytes), Err(ReplyError::BadError(-2)));

    // A positive error.
    let bytes: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0x02, 0x00, 0x00, 0x00, // error = +2
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
    ];
    assert_eq!(parse_reply(bytes), Err(ReplyError::BadError(2)));

    // Below -511.
    let bytes: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0x00, 0xfe, 0xff, 0xff, // error = -512
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
    ];
    assert_eq!(parse_reply(bytes), Err(ReplyError::BadError(-512)));

    let bytes: &[u8] = &[
        0x10, 0x00, 0x00, 0x00, // len = 16
        0x00, 0x00, 0x00, 0x80, // error = i32::MIN
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // unique = 1
    ];
    assert_eq!(parse_reply(bytes), Err(ReplyError::BadError(i32::MIN)));
}
