//! Parsing kernel-to-daemon messages. Every malformed input is an error
//! value; nothing here panics or trusts a length it has not checked.

use std::fmt;

use zerocopy::FromBytes;

use crate::abi::{self, opcode, InHeader};

/// Why a message could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseErrorKind {
    /// Fewer bytes than a `fuse_in_header`.
    ShortHeader,
    /// `fuse_in_header.len` disagrees with the bytes received.
    LengthMismatch {
        /// The length the header claims, in bytes.
        header_len: u32,
        /// The bytes actually received.
        received: usize,
    },
    /// The body is shorter than the opcode's argument structure.
    ShortBody {
        /// The request's opcode.
        opcode: u32,
        /// Bytes of body the opcode's arguments need.
        needed: usize,
        /// Bytes of body received.
        got: usize,
    },
    /// A WRITE whose `size` disagrees with the data that follows.
    WriteSizeMismatch {
        /// `fuse_write_in.size`.
        size: u32,
        /// Bytes of data that follow the `fuse_write_in`.
        data: usize,
    },
    /// A name that is empty, lacks its NUL terminator or contains '/'.
    BadName,
    /// An opcode this crate does not parse.
    UnknownOpcode(u32),
}

/// A message that could not be parsed. When the header itself was sound,
/// it is kept so that the caller can answer the request with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    /// What was wrong.
    pub kind: ParseErrorKind,
    /// The message's header, if it was whole and its length right.
    pub header: Option<InHeader>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ParseErrorKind::ShortHeader => write!(f, "message shorter than a FUSE header"),
            ParseErrorKind::LengthMismatch {
                header_len,
                received,
            } => write!(
                f,
                "header says {header_len} bytes but {received} were received"
            ),
            ParseErrorKind::ShortBody {
                opcode,
                needed,
                got,
            } => write!(
                f,
                "opcode {opcode}: body of {got} bytes, at least {needed} needed"
            ),
            ParseErrorKind::WriteSizeMismatch { size, data } => {
                write!(f, "WRITE of {size} bytes carries {data} bytes of data")
            }
            ParseErrorKind::BadName => write!(f, "malformed file name"),
            ParseErrorKind::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// What a request asks for, with its arguments borrowed from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation<'a> {
    /// FUSE_INIT, the handshake (zero-filled past what older kernels send).
    Init(abi::InitIn),
    /// FUSE_DESTROY: the filesystem goes away; the last request.
    Destroy,
    /// FUSE_INTERRUPT of an earlier request; never answered.
    Interrupt(abi::InterruptIn),
    /// FUSE_LOOKUP of a name in the directory `header.nodeid`.
    Lookup {
        /// The name, without its NUL terminator; never empty, no '/'.
        name: &'a [u8],
    },
    /// FUSE_FORGET; never answered.
    Forget(abi::ForgetIn),
    /// FUSE_BATCH_FORGET; never answered.
    BatchForget {
        /// Number of `fuse_forget_one` entries (all present, checked).
        count: u32,
    },
    /// FUSE_GETATTR.
    Getattr(abi::GetattrIn),
    /// FUSE_SETATTR (truncate, chmod, utimes...).
    Setattr(abi::SetattrIn),
    /// FUSE_OPEN.
    Open(abi::OpenIn),
    /// FUSE_OPENDIR.
    Opendir(abi::OpenIn),
    /// FUSE_READ.
    Read(abi::ReadIn),
    /// FUSE_READDIR.
    Readdir(abi::ReadIn),
    /// FUSE_READDIRPLUS.
    Readdirplus(abi::ReadIn),
    /// FUSE_WRITE.
    Write {
        /// The `fuse_write_in`; `arg.size` equals `data.len()` (checked).
        arg: abi::WriteIn,
        /// The bytes to write.
        data: &'a [u8],
    },
    /// FUSE_STATFS.
    Statfs,
    /// FUSE_RELEASE.
    Release(abi::ReleaseIn),
    /// FUSE_RELEASEDIR.
    Releasedir(abi::ReleaseIn),
    /// FUSE_FSYNC.
    Fsync(abi::FsyncIn),
    /// FUSE_FSYNCDIR.
    Fsyncdir(abi::FsyncIn),
    /// FUSE_FLUSH.
    Flush(abi::FlushIn),
    /// FUSE_FALLOCATE (punch hole, zero range, allocate).
    Fallocate(abi::FallocateIn),
    /// FUSE_ACCESS.
    Access(abi::AccessIn),
    /// An opcode this crate knows by number but whose arguments fuse-blk
    /// never needs (xattrs, links, locks, ...): answered with an errno.
    Unsupported(u32),
}

/// One parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The message's header: opcode, unique, node, caller.
    pub header: InHeader,
    /// What it asks, with its arguments.
    pub operation: Operation<'a>,
}

impl Request<'_> {
    /// The request's id, which its reply must carry.
    pub fn unique(&self) -> u64 {
        self.header.unique
    }

    /// Whether the kernel waits for an answer. FORGET and BATCH_FORGET
    /// must never be answered.
    pub fn expects_reply(&self) -> bool {
        !matches!(
            self.operation,
            Operation::Forget(_) | Operation::BatchForget { .. }
        )
    }
}

/// Reads a fixed-size argument from the front of `body`, zero-filling what a
/// shorter (older-protocol) body lacks when `min` allows it.
fn argument<T: FromBytes + Default + zerocopy::IntoBytes>(
    header: &InHeader,
    body: &[u8],
    min: usize,
) -> Result<(T, usize), ParseError> {
    let size = std::mem::size_of::<T>();
    if body.len() < min {
        return Err(ParseError {
            kind: ParseErrorKind::ShortBody {
                opcode: header.opcode,
                needed: min,
                got: body.len(),
            },
            header: Some(*header),
        });
    }
    let take = size.min(body.len());
    let mut value = T::default();
    value.as_mut_bytes()[..take].copy_from_slice(&body[..take]);
    Ok((value, take))
}

fn full<T: FromBytes + Default + zerocopy::IntoBytes>(
    header: &InHeader,
    body: &[u8],
) -> Result<T, ParseError> {
    argument::<T>(header, body, std::mem::size_of::<T>()).map(|(value, _)| value)
}

fn name<'a>(header: &InHeader, body: &'a [u8]) -> Result<&'a [u8], ParseError> {
    let bad = ParseError {
        kind: ParseErrorKind::BadName,
        header: Some(*header),
    };
    let end = body.iter().position(|&b| b == 0).ok_or(bad)?;
    let name = &body[..end];
    if name.is_empty() || name.contains(&b'/') {
        return Err(bad);
    }
    Ok(name)
}

/// Splits one whole message into its header and the rest, checking that
/// the header's length is the message's: the framing every message read
/// from a FUSE descriptor (`/dev/fuse`, a fuse-blk channel, `/dev/cuse`)
/// shares, before its opcode says what follows.
pub(crate) fn split_message(buf: &[u8]) -> Result<(InHeader, &[u8]), ParseError> {
    let Ok((header, body)) = InHeader::read_from_prefix(buf) else {
        return Err(ParseError {
            kind: ParseErrorKind::ShortHeader,
            header: None,
        });
    };
    if header.len as usize != buf.len() {
        return Err(ParseError {
            kind: ParseErrorKind::LengthMismatch {
                header_len: header.len,
                received: buf.len(),
            },
            header: None,
        });
    }
    Ok((header, body))
}

/// Parses one whole message as read from the channel.
pub fn parse_request(buf: &[u8]) -> Result<Request<'_>, ParseError> {
    let (header, body) = split_message(buf)?;
    let h = &header;
    let operation = match header.opcode {
        // Kernels before 7.36 send only major, minor, max_readahead, flags.
        opcode::INIT => Operation::Init(argument(h, body, 16)?.0),
        opcode::DESTROY => Operation::Destroy,
        opcode::INTERRUPT => Operation::Interrupt(full(h, body)?),
        opcode::LOOKUP => Operation::Lookup {
            name: name(h, body)?,
        },
        opcode::FORGET => Operation::Forget(full(h, body)?),
        opcode::BATCH_FORGET => {
            let arg: abi::BatchForgetIn = full(h, body)?;
            let entries = (body.len() - std::mem::size_of::<abi::BatchForgetIn>()) as u64;
            // In u64: count * 16 cannot overflow it, while it can a 32-bit usize.
            let needed = u64::from(arg.count) * std::mem::size_of::<abi::ForgetOne>() as u64;
            if entries < needed {
                let header_and_entries = needed + std::mem::size_of::<abi::BatchForgetIn>() as u64;
                return Err(ParseError {
                    kind: ParseErrorKind::ShortBody {
                        opcode: header.opcode,
                        needed: usize::try_from(header_and_entries).unwrap_or(usize::MAX),
                        got: body.len(),
                    },
                    header: Some(header),
                });
            }
            Operation::BatchForget { count: arg.count }
        }
        opcode::GETATTR => Operation::Getattr(full(h, body)?),
        opcode::SETATTR => Operation::Setattr(full(h, body)?),
        opcode::OPEN => Operation::Open(full(h, body)?),
        opcode::OPENDIR => Operation::Opendir(full(h, body)?),
        opcode::READ => Operation::Read(full(h, body)?),
        opcode::READDIR => Operation::Readdir(full(h, body)?),
        opcode::READDIRPLUS => Operation::Readdirplus(full(h, body)?),
        opcode::WRITE => {
            let arg: abi::WriteIn = full(h, body)?;
            let data = &body[std::mem::size_of::<abi::WriteIn>()..];
            if data.len() != arg.size as usize {
                return Err(ParseError {
                    kind: ParseErrorKind::WriteSizeMismatch {
                        size: arg.size,
                        data: data.len(),
                    },
                    header: Some(header),
                });
            }
            Operation::Write { arg, data }
        }
        opcode::STATFS => Operation::Statfs,
        opcode::RELEASE => Operation::Release(full(h, body)?),
        opcode::RELEASEDIR => Operation::Releasedir(full(h, body)?),
        opcode::FSYNC => Operation::Fsync(full(h, body)?),
        opcode::FSYNCDIR => Operation::Fsyncdir(full(h, body)?),
        opcode::FLUSH => Operation::Flush(full(h, body)?),
        opcode::FALLOCATE => Operation::Fallocate(full(h, body)?),
        opcode::ACCESS => Operation::Access(full(h, body)?),
        op @ (opcode::READLINK
        | opcode::SYMLINK
        | opcode::MKNOD
        | opcode::MKDIR
        | opcode::UNLINK
        | opcode::RMDIR
        | opcode::RENAME
        | opcode::LINK
        | opcode::SETXATTR
        | opcode::GETXATTR
        | opcode::LISTXATTR
        | opcode::REMOVEXATTR
        | opcode::GETLK
        | opcode::SETLK
        | opcode::SETLKW
        | opcode::CREATE
        | opcode::BMAP
        | opcode::IOCTL
        | opcode::POLL
        | opcode::RENAME2
        | opcode::LSEEK
        | opcode::COPY_FILE_RANGE
        | opcode::SYNCFS
        | opcode::TMPFILE
        | opcode::STATX) => Operation::Unsupported(op),
        op => {
            return Err(ParseError {
                kind: ParseErrorKind::UnknownOpcode(op),
                header: Some(header),
            })
        }
    };
    Ok(Request { header, operation })
}

/// Parses a request delivered in two buffers, as io_uring transports do:
/// `head` starts with the header and the argument, `payload` starts with a
/// WRITE's data. Both may be longer than what they hold; `fuse_in_header.len`
/// says how much of them is the message. Only WRITE carries data in
/// `payload`; every other message lies whole in `head`.
pub fn parse_request_split<'a>(
    head: &'a [u8],
    payload: &'a [u8],
) -> Result<Request<'a>, ParseError> {
    let Ok((header, _)) = InHeader::read_from_prefix(head) else {
        return Err(ParseError {
            kind: ParseErrorKind::ShortHeader,
            header: None,
        });
    };
    let len = header.len as usize;
    if header.opcode != opcode::WRITE {
        let Some(message) = head.get(..len) else {
            return Err(ParseError {
                kind: ParseErrorKind::LengthMismatch {
                    header_len: header.len,
                    received: head.len(),
                },
                header: None,
            });
        };
        return parse_request(message);
    }
    let fixed = std::mem::size_of::<InHeader>() + std::mem::size_of::<abi::WriteIn>();
    let arg: abi::WriteIn = full(
        &header,
        head.get(std::mem::size_of::<InHeader>()..).unwrap_or(&[]),
    )?;
    let data_len = len.checked_sub(fixed).filter(|&n| n <= payload.len());
    let Some(data_len) = data_len else {
        return Err(ParseError {
            kind: ParseErrorKind::LengthMismatch {
                header_len: header.len,
                received: fixed + payload.len(),
            },
            header: None,
        });
    };
    if data_len != arg.size as usize {
        return Err(ParseError {
            kind: ParseErrorKind::WriteSizeMismatch {
                size: arg.size,
                data: data_len,
            },
            header: Some(header),
        });
    }
    Ok(Request {
        header,
        operation: Operation::Write {
            arg,
            data: &payload[..data_len],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn header(opcode: u32) -> InHeader {
        InHeader {
            opcode,
            unique: 3,
            ..InHeader::default()
        }
    }

    #[test]
    fn argument_zero_fills_a_short_body_above_the_minimum() {
        let h = header(opcode::INIT);
        let body = [7, 0, 0, 0, 31, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 9];
        let (init, took): (abi::InitIn, usize) = argument(&h, &body, 16).unwrap();
        assert_eq!(took, 17);
        assert_eq!(&init.as_bytes()[..17], &body[..]);
        assert!(init.as_bytes()[17..].iter().all(|&b| b == 0));
    }

    #[test]
    fn argument_takes_only_the_structure_from_a_long_body() {
        let h = header(opcode::ACCESS);
        let (arg, took): (abi::AccessIn, usize) =
            argument(&h, &[1, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff], 8).unwrap();
        assert_eq!(took, 8);
        assert_eq!(arg.mask, 1);
    }

    #[test]
    fn full_requires_the_whole_structure() {
        let h = header(opcode::READ);
        let e = full::<abi::ReadIn>(&h, &[0; 39]).unwrap_err();
        assert_eq!(
            e.kind,
            ParseErrorKind::ShortBody {
                opcode: opcode::READ,
                needed: 40,
                got: 39
            }
        );
        assert_eq!(e.header, Some(h));
    }

    #[test]
    fn name_rules() {
        let h = header(opcode::LOOKUP);
        assert_eq!(name(&h, b"a\0").unwrap(), b"a");
        assert_eq!(name(&h, b"..\0").unwrap(), b"..");
        assert_eq!(name(&h, b"x\0y").unwrap(), b"x");
        for bad in [&b""[..], b"\0", b"abc", b"a/\0"] {
            assert_eq!(name(&h, bad).unwrap_err().kind, ParseErrorKind::BadName);
        }
    }

    #[test]
    fn every_error_kind_displays() {
        for kind in [
            ParseErrorKind::ShortHeader,
            ParseErrorKind::LengthMismatch {
                header_len: 1,
                received: 2,
            },
            ParseErrorKind::ShortBody {
                opcode: 15,
                needed: 40,
                got: 3,
            },
            ParseErrorKind::WriteSizeMismatch { size: 1, data: 2 },
            ParseErrorKind::BadName,
            ParseErrorKind::UnknownOpcode(9999),
        ] {
            let e: Box<dyn std::error::Error> = Box::new(ParseError { kind, header: None });
            assert!(!e.to_string().is_empty());
        }
        let e = ParseError {
            kind: ParseErrorKind::UnknownOpcode(9999),
            header: None,
        };
        assert!(e.to_string().contains("9999"));
    }

    #[test]
    fn request_accessors() {
        let request = Request {
            header: header(opcode::FORGET),
            operation: Operation::Forget(abi::ForgetIn { nlookup: 1 }),
        };
        assert_eq!(request.unique(), 3);
        assert!(!request.expects_reply());
        let request = Request {
            header: header(opcode::INTERRUPT),
            operation: Operation::Interrupt(abi::InterruptIn { unique: 1 }),
        };
        // INTERRUPT is left to the engine; it is not a forget.
        assert!(request.expects_reply());
    }
}
