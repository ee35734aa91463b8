//! What a CUSE server (a character device served in userspace through
//! `/dev/cuse`) reads and writes besides the file messages of
//! [`crate::request`]: the CUSE_INIT handshake, which names the device, and
//! POLL with its wake-up notification. No I/O.
//!
//! The kernel sends CUSE_INIT as the first message on a `/dev/cuse`
//! descriptor; the reply's device info (`DEVNAME=name`) makes it create
//! `/dev/name` (a `/` in the name makes subdirectories). Every open of that
//! node is then a FUSE_OPEN, every `read(2)`/`write(2)` on it one or more
//! FUSE_READ/FUSE_WRITE of at most `max_read`/`max_write` bytes, whose
//! `offset` counts the bytes of the same system call moved so far (it
//! starts at 0 on every call), `poll(2)` a FUSE_POLL, `close(2)` FUSE_FLUSH
//! and FUSE_RELEASE.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{self, opcode, CuseInitIn, CuseInitOut, InHeader, OutHeader, PollIn};
use crate::request::{parse_request, split_message, ParseError, ParseErrorKind, Request};

/// One message read from `/dev/cuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CuseRequest<'a> {
    /// CUSE_INIT, the first message; answer with the device's name.
    Init {
        /// The message's header.
        header: InHeader,
        /// The kernel's versions and flags.
        arg: CuseInitIn,
    },
    /// FUSE_POLL on an open device file.
    Poll {
        /// The message's header.
        header: InHeader,
        /// Which events are asked for, and the handle to notify.
        arg: PollIn,
    },
    /// Every other message, as [`parse_request`] parses it.
    File(Request<'a>),
}

impl CuseRequest<'_> {
    /// The request's id, which its reply must carry.
    pub fn unique(&self) -> u64 {
        match self {
            CuseRequest::Init { header, .. } | CuseRequest::Poll { header, .. } => header.unique,
            CuseRequest::File(request) => request.unique(),
        }
    }
}

fn fixed<T: FromBytes>(header: &InHeader, body: &[u8]) -> Result<T, ParseError> {
    T::read_from_prefix(body)
        .map(|(value, _)| value)
        .map_err(|_| ParseError {
            kind: ParseErrorKind::ShortBody {
                opcode: header.opcode,
                needed: std::mem::size_of::<T>(),
                got: body.len(),
            },
            header: Some(*header),
        })
}

/// Parses one whole message as read from `/dev/cuse`.
pub fn parse_cuse_request(buf: &[u8]) -> Result<CuseRequest<'_>, ParseError> {
    let (header, body) = split_message(buf)?;
    match header.opcode {
        opcode::CUSE_INIT => Ok(CuseRequest::Init {
            header,
            arg: fixed(&header, body)?,
        }),
        opcode::POLL => Ok(CuseRequest::Poll {
            header,
            arg: fixed(&header, body)?,
        }),
        _ => parse_request(buf).map(CuseRequest::File),
    }
}

/// The reply to CUSE_INIT: `out` then the device info, one
/// `DEVNAME=devname` string. None if the name is empty, holds a NUL, or
/// does not fit the kernel's page for it.
pub fn encode_cuse_init_reply(unique: u64, out: &CuseInitOut, devname: &str) -> Option<Vec<u8>> {
    let info = format!("DEVNAME={devname}\0");
    if devname.is_empty() || devname.contains('\0') || info.len() > abi::CUSE_INIT_INFO_MAX {
        return None;
    }
    let len = std::mem::size_of::<OutHeader>() + std::mem::size_of::<CuseInitOut>() + info.len();
    let header = OutHeader {
        len: len as u32,
        error: 0,
        unique,
    };
    let mut reply = Vec::with_capacity(len);
    reply.extend_from_slice(header.as_bytes());
    reply.extend_from_slice(out.as_bytes());
    reply.extend_from_slice(info.as_bytes());
    Some(reply)
}

/// The notification that wakes the poll waiters registered with `kh`
/// (FUSE_NOTIFY_POLL).
pub fn encode_poll_wakeup(kh: u64) -> Vec<u8> {
    let body = abi::NotifyPollWakeupOut { kh };
    let header = OutHeader {
        len: (std::mem::size_of::<OutHeader>() + std::mem::size_of_val(&body)) as u32,
        error: abi::notify::POLL,
        unique: 0,
    };
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Operation;

    fn message(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let header = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique,
            ..InHeader::default()
        };
        let mut buf = header.as_bytes().to_vec();
        buf.extend_from_slice(body);
        buf
    }

    #[test]
    fn cuse_init_is_parsed() {
        // major 7, minor 41, unused, flags UNRESTRICTED_IOCTL
        let body = [7, 0, 0, 0, 41, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let buf = message(4096, 2, &body);
        match parse_cuse_request(&buf).unwrap() {
            CuseRequest::Init { header, arg } => {
                assert_eq!(header.unique, 2);
                assert_eq!((arg.major, arg.minor, arg.flags), (7, 41, 1));
            }
            other => panic!("{other:?}"),
        }
        let short = message(4096, 2, &body[..12]);
        assert!(matches!(
            parse_cuse_request(&short).unwrap_err().kind,
            ParseErrorKind::ShortBody { needed: 16, .. }
        ));
    }

    #[test]
    fn poll_is_parsed_and_the_rest_delegated() {
        let poll = PollIn {
            fh: 5,
            kh: 9,
            flags: abi::poll_flags::SCHEDULE_NOTIFY,
            events: 1,
        };
        let buf = message(opcode::POLL, 3, poll.as_bytes());
        assert_eq!(
            parse_cuse_request(&buf).unwrap(),
            CuseRequest::Poll {
                header: InHeader::read_from_prefix(&buf).unwrap().0,
                arg: poll
            }
        );
        let release = abi::ReleaseIn {
            fh: 5,
            ..abi::ReleaseIn::default()
        };
        let buf = message(opcode::RELEASE, 4, release.as_bytes());
        let request = parse_cuse_request(&buf).unwrap();
        assert_eq!(request.unique(), 4);
        assert!(matches!(
            request,
            CuseRequest::File(Request {
                operation: Operation::Release(abi::ReleaseIn { fh: 5, .. }),
                ..
            })
        ));
        assert_eq!(
            parse_cuse_request(&buf[..20]).unwrap_err().kind,
            ParseErrorKind::ShortHeader
        );
    }

    #[test]
    fn init_reply_bytes() {
        let out = CuseInitOut {
            major: 7,
            minor: 31,
            max_read: 0x20000,
            max_write: 0x20000,
            ..CuseInitOut::default()
        };
        let reply = encode_cuse_init_reply(2, &out, "dm-user/a").unwrap();
        let info = b"DEVNAME=dm-user/a\0";
        assert_eq!(reply.len(), 16 + 72 + info.len());
        assert_eq!(&reply[..4], &((16 + 72 + info.len()) as u32).to_le_bytes());
        assert_eq!(&reply[4..8], &[0; 4]);
        assert_eq!(&reply[8..16], &2u64.to_le_bytes());
        assert_eq!(&reply[16..20], &7u32.to_le_bytes());
        assert_eq!(&reply[20..24], &31u32.to_le_bytes());
        assert_eq!(&reply[32..36], &0x20000u32.to_le_bytes());
        assert_eq!(&reply[16 + 72..], info);
        assert!(encode_cuse_init_reply(2, &out, "").is_none());
        assert!(encode_cuse_init_reply(2, &out, "a\0b").is_none());
        assert!(encode_cuse_init_reply(2, &out, &"x".repeat(4096)).is_none());
    }

    #[test]
    fn poll_wakeup_bytes() {
        let n = encode_poll_wakeup(0x1122);
        assert_eq!(n.len(), 24);
        assert_eq!(&n[..4], &24u32.to_le_bytes());
        assert_eq!(&n[4..8], &1i32.to_le_bytes());
        assert_eq!(&n[8..16], &[0; 8]);
        assert_eq!(&n[16..], &0x1122u64.to_le_bytes());
    }
}
