//! The other side of the channel: encoding requests and parsing replies.
//! The fuser adapter speaks to an in-process `fuser::Session` this way, and
//! tests use it to drive a session engine without a kernel.

use std::fmt;

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{InHeader, OutHeader};
use crate::reply::MAX_ERRNO;

/// Encodes one request: a header with the length filled in, then `args`.
pub fn encode_request(opcode: u32, unique: u64, nodeid: u64, args: &[&[u8]]) -> Vec<u8> {
    let body: usize = args.iter().map(|a| a.len()).sum();
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + body) as u32,
        opcode,
        unique,
        nodeid,
        ..InHeader::default()
    };
    let mut out = header.as_bytes().to_vec();
    for arg in args {
        out.extend_from_slice(arg);
    }
    out
}

/// Why a reply could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    /// Fewer bytes than a `fuse_out_header`.
    ShortHeader,
    /// `fuse_out_header.len` disagrees with the bytes received.
    LengthMismatch {
        /// The length the header claims, in bytes.
        header_len: u32,
        /// The bytes actually received.
        received: usize,
    },
    /// An error outside -511..=0, or an error reply that carries data.
    BadError(i32),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::ShortHeader => write!(f, "reply shorter than a FUSE header"),
            ReplyError::LengthMismatch {
                header_len,
                received,
            } => write!(
                f,
                "reply header says {header_len} bytes but {received} were received"
            ),
            ReplyError::BadError(e) => write!(f, "invalid error {e} in reply"),
        }
    }
}

impl std::error::Error for ReplyError {}

/// A parsed reply: the unique it answers and either an errno or a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<'a> {
    /// The `unique` of the request this answers.
    pub unique: u64,
    /// The payload after the header, or a positive errno.
    pub result: Result<&'a [u8], i32>,
}

/// Parses one whole reply as written by a daemon.
pub fn parse_reply(buf: &[u8]) -> Result<Reply<'_>, ReplyError> {
    let (header, payload) =
        OutHeader::read_from_prefix(buf).map_err(|_| ReplyError::ShortHeader)?;
    if header.len as usize != buf.len() {
        return Err(ReplyError::LengthMismatch {
            header_len: header.len,
            received: buf.len(),
        });
    }
    let result = match header.error {
        0 => Ok(payload),
        e if (-MAX_ERRNO..0).contains(&e) && payload.is_empty() => Err(-e),
        e => return Err(ReplyError::BadError(e)),
    };
    Ok(Reply {
        unique: header.unique,
        result,
    })
}

/// Reads a fixed-size structure from the front of a reply payload.
pub fn read_struct<T: FromBytes>(payload: &[u8]) -> Option<T> {
    T::read_from_prefix(payload).ok().map(|(value, _)| value)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::WriteOut;

    #[test]
    fn encode_request_fills_the_length() {
        let bytes = encode_request(15, 9, 2, &[&[1, 2], &[3]]);
        let header = InHeader::read_from_prefix(&bytes).unwrap().0;
        assert_eq!(header.len, 43);
        assert_eq!((header.opcode, header.unique, header.nodeid), (15, 9, 2));
        assert_eq!(&bytes[40..], &[1, 2, 3]);
    }

    #[test]
    fn read_struct_needs_enough_bytes() {
        assert_eq!(read_struct::<WriteOut>(&[0; 7]), None);
        assert_eq!(
            read_struct::<WriteOut>(&[8, 0, 0, 0, 0, 0, 0, 0, 0xff]),
            Some(WriteOut {
                size: 8,
                padding: 0
            })
        );
    }

    #[test]
    fn parse_reply_error_bounds() {
        let reply = |error: i32| {
            OutHeader {
                len: 16,
                error,
                unique: 1,
            }
            .as_bytes()
            .to_vec()
        };
        assert_eq!(parse_reply(&reply(-1)).unwrap().result, Err(1));
        assert_eq!(
            parse_reply(&reply(-MAX_ERRNO)).unwrap().result,
            Err(MAX_ERRNO)
        );
        assert_eq!(
            parse_reply(&reply(-MAX_ERRNO - 1)),
            Err(ReplyError::BadError(-MAX_ERRNO - 1))
        );
        assert_eq!(parse_reply(&reply(1)), Err(ReplyError::BadError(1)));
    }

    #[test]
    fn reply_errors_display() {
        for e in [
            ReplyError::ShortHeader,
            ReplyError::LengthMismatch {
                header_len: 1,
                received: 2,
            },
            ReplyError::BadError(7),
        ] {
            let e: Box<dyn std::error::Error> = Box::new(e);
            assert!(!e.to_string().is_empty());
        }
    }
}
