//! Encoding daemon-to-kernel replies. A reply is an `OutHeader` followed by
//! the operation's payload; callers hand both to one `writev`.

use zerocopy::IntoBytes;

use crate::abi::{self, DirentHeader, OutHeader};

/// Largest errno the kernel accepts in `fuse_out_header.error`.
pub const MAX_ERRNO: i32 = 511;

/// Header of a successful reply carrying `payload_len` bytes.
pub fn success_header(unique: u64, payload_len: usize) -> OutHeader {
    OutHeader {
        len: (std::mem::size_of::<OutHeader>() + payload_len) as u32,
        error: 0,
        unique,
    }
}

/// Header of an error reply. The kernel refuses errors outside 1..=511
/// with EINVAL and would leave the request hanging, so such a value is
/// reported as EIO instead.
pub fn error_header(unique: u64, errno: i32) -> OutHeader {
    let errno = if (1..=MAX_ERRNO).contains(&errno) {
        errno
    } else {
        libc_eio()
    };
    OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    }
}

const fn libc_eio() -> i32 {
    5
}

/// A whole reply as one buffer: for tests and for transports that cannot
/// gather.
pub fn encode_reply(unique: u64, payload: &[&[u8]]) -> Vec<u8> {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let mut out = success_header(unique, len).as_bytes().to_vec();
    for part in payload {
        out.extend_from_slice(part);
    }
    out
}

/// Size of a directory entry with a name of `name_len` bytes, padded to 8.
pub fn dirent_size(name_len: usize) -> usize {
    (std::mem::size_of::<DirentHeader>() + name_len + 7) & !7
}

/// Appends one `fuse_dirent` to a READDIR reply unless it would grow the
/// reply past `limit` bytes; returns whether it was appended.
pub fn push_dirent(
    buf: &mut Vec<u8>,
    limit: usize,
    ino: u64,
    off: u64,
    typ: u32,
    name: &[u8],
) -> bool {
    let size = dirent_size(name.len());
    if buf.len() + size > limit {
        return false;
    }
    let header = DirentHeader {
        ino,
        off,
        namelen: name.len() as u32,
        typ,
    };
    let start = buf.len();
    buf.extend_from_slice(header.as_bytes());
    buf.extend_from_slice(name);
    buf.resize(start + size, 0);
    true
}
/// The notification that has the kernel forget the attributes it cached
/// for node `ino` (FUSE_NOTIFY_INVAL_INODE with a negative offset: the page
/// cache is left alone), so that its next stat asks the daemon again.
pub fn encode_inval_attributes(ino: u64) -> Vec<u8> {
    let body = abi::NotifyInvalInodeOut {
        ino,
        off: -1,
        len: 0,
    };
    let header = OutHeader {
        len: (std::mem::size_of::<OutHeader>() + std::mem::size_of_val(&body)) as u32,
        error: abi::notify::INVAL_INODE,
        unique: 0,
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eio_is_linux_eio() {
        assert_eq!(libc_eio(), 5);
    }

    #[test]
    fn success_header_counts_the_header() {
        let h = success_header(1, 0);
        assert_eq!((h.len, h.error, h.unique), (16, 0, 1));
        assert_eq!(success_header(1, 4096).len, 4112);
    }

    #[test]
    fn error_header_range() {
        assert_eq!(error_header(1, 1).error, -1);
        assert_eq!(error_header(1, MAX_ERRNO).error, -MAX_ERRNO);
        for bad in [0, -1, MAX_ERRNO + 1, i32::MIN, i32::MAX] {
            assert_eq!(error_header(1, bad).error, -5, "{bad}");
        }
        assert_eq!(error_header(1, 2).len, 16);
    }

    #[test]
    fn dirent_size_is_padded() {
        for len in 0..64 {
            let size = dirent_size(len);
            assert_eq!(size % 8, 0);
            assert!(size >= 24 + len && size < 24 + len + 8);
        }
    }

    #[test]
    fn push_dirent_appends_after_existing_entries() {
        let mut buf = vec![0xaa; 8];
        assert!(push_dirent(&mut buf, 100, 1, 2, 3, b"n"));
        assert_eq!(buf.len(), 8 + 32);
        assert_eq!(&buf[..8], &[0xaa; 8]);
        assert_eq!(buf[8 + 24], b'n');
        assert!(buf[8 + 25..].iter().all(|&b| b == 0));
    }

    #[test]
    fn attribute_invalidation_bytes() {
        let bytes = encode_inval_attributes(2);
        let mut expected = Vec::new();
        expected.extend_from_slice(&40u32.to_le_bytes()); // len
        expected.extend_from_slice(&2i32.to_le_bytes()); // FUSE_NOTIFY_INVAL_INODE
        expected.extend_from_slice(&0u64.to_le_bytes()); // unique
        expected.extend_from_slice(&2u64.to_le_bytes()); // ino
        expected.extend_from_slice(&(-1i64).to_le_bytes()); // off: attributes only
        expected.extend_from_slice(&0i64.to_le_bytes()); // len
        assert_eq!(bytes, expected);
    }
}
