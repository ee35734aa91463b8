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
    LengthMismatch { header_len: u32, received: usize },
    /// The body is shorter than the opcode's argument structure.
    ShortBody { opcode: u32, needed: usize, got: usize },
    /// A WRITE whose `size` disagrees with the data that follows.
    WriteSizeMismatch { size: u32, data: usize },
    /// A name that is empty, lacks its NUL terminator or contains '/'.
    BadName,
    /// An opcode this crate does not parse.
    UnknownOpcode(u32),
}

/// A message that could not be parsed. When the header itself was sound,
/// it is kept so that the caller can answer the request with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseError {
    pub kind: ParseErrorKind,
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
    Init(abi::InitIn),
    Destroy,
    Interrupt(abi::InterruptIn),
    Lookup { name: &'a [u8] },
    Forget(abi::ForgetIn),
    BatchForget { count: u32 },
    Getattr(abi::GetattrIn),
    Setattr(abi::SetattrIn),
    Open(abi::OpenIn),
    Opendir(abi::OpenIn),
    Read(abi::ReadIn),
    Readdir(abi::ReadIn),
    Readdirplus(abi::ReadIn),
    Write { arg: abi::WriteIn, data: &'a [u8] },
    Statfs,
    Release(abi::ReleaseIn),
    Releasedir(abi::ReleaseIn),
    Fsync(abi::FsyncIn),
    Fsyncdir(abi::FsyncIn),
    Flush(abi::FlushIn),
    Fallocate(abi::FallocateIn),
    Access(abi::AccessIn),
    /// An opcode this crate knows by number but whose arguments fuse-blk
    /// never needs (xattrs, links, locks, ...): answered with an errno.
    Unsupported(u32),
}

/// One parsed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub header: InHeader,
    pub operation: Operation<'a>,
}

impl Request<'_> {
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

/// Parses one whole message as read from the channel.
pub fn parse_request(buf: &[u8]) -> Result<Request<'_>, ParseError> {
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
            let entries = body.len() - std::mem::size_of::<abi::BatchForgetIn>();
            let needed = arg.count as usize * std::mem::size_of::<abi::ForgetOne>();
            if entries < needed {
                return Err(ParseError {
                    kind: ParseErrorKind::ShortBody {
                        opcode: header.opcode,
                        needed: needed + 8,
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
