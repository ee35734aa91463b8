//! Property tests: the parsers never panic on any input, and encoding then
//! parsing gives back what was encoded.

use fuse_blk_proto::abi::{self, opcode, InHeader};
use fuse_blk_proto::client::{encode_request, parse_reply};
use fuse_blk_proto::{parse_request, Operation, ParseErrorKind};
use proptest::prelude::*;
use zerocopy::IntoBytes;

const HEADER: usize = std::mem::size_of::<InHeader>();

/// Every opcode number in `abi::opcode`.
const KNOWN_OPCODES: &[u32] = &[
    opcode::LOOKUP,
    opcode::FORGET,
    opcode::GETATTR,
    opcode::SETATTR,
    opcode::READLINK,
    opcode::SYMLINK,
    opcode::MKNOD,
    opcode::MKDIR,
    opcode::UNLINK,
    opcode::RMDIR,
    opcode::RENAME,
    opcode::LINK,
    opcode::OPEN,
    opcode::READ,
    opcode::WRITE,
    opcode::STATFS,
    opcode::RELEASE,
    opcode::FSYNC,
    opcode::SETXATTR,
    opcode::GETXATTR,
    opcode::LISTXATTR,
    opcode::REMOVEXATTR,
    opcode::FLUSH,
    opcode::INIT,
    opcode::OPENDIR,
    opcode::READDIR,
    opcode::RELEASEDIR,
    opcode::FSYNCDIR,
    opcode::GETLK,
    opcode::SETLK,
    opcode::SETLKW,
    opcode::ACCESS,
    opcode::CREATE,
    opcode::INTERRUPT,
    opcode::BMAP,
    opcode::DESTROY,
    opcode::IOCTL,
    opcode::POLL,
    opcode::NOTIFY_REPLY,
    opcode::BATCH_FORGET,
    opcode::FALLOCATE,
    opcode::READDIRPLUS,
    opcode::RENAME2,
    opcode::LSEEK,
    opcode::COPY_FILE_RANGE,
    opcode::SYNCFS,
    opcode::TMPFILE,
    opcode::STATX,
];

/// Cases per property: `PROPTEST_CASES` when set (tests/soak runs a
/// million), else `default`. (`with_cases` alone would override it.)
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Parses and checks the invariants every result must satisfy.
fn check(bytes: &[u8]) {
    match parse_request(bytes) {
        Ok(request) => {
            assert!(bytes.len() >= HEADER);
            assert_eq!(request.header.len as usize, bytes.len());
            if let Operation::Write { arg, data } = request.operation {
                assert_eq!(arg.size as usize, data.len());
            }
            if let Operation::Lookup { name } = request.operation {
                assert!(!name.is_empty() && !name.contains(&0) && !name.contains(&b'/'));
            }
        }
        Err(e) => {
            let _ = e.to_string();
            if let ParseErrorKind::UnknownOpcode(op) = e.kind {
                assert!(!KNOWN_OPCODES[..].contains(&op) || op == opcode::NOTIFY_REPLY);
                assert_eq!(e.header.map(|h| h.opcode), Some(op));
            }
        }
    }
}

/// A header whose `len` matches a body of `body_len` bytes.
fn header_bytes(
    opcode: u32,
    unique: u64,
    nodeid: u64,
    ids: (u32, u32, u32),
    body_len: usize,
) -> Vec<u8> {
    InHeader {
        len: (HEADER + body_len) as u32,
        opcode,
        unique,
        nodeid,
        uid: ids.0,
        gid: ids.1,
        pid: ids.2,
        total_extlen: 0,
        padding: 0,
    }
    .as_bytes()
    .to_vec()
}

fn read_in() -> impl Strategy<Value = abi::ReadIn> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(
            |(fh, offset, size, read_flags, lock_owner, flags, padding)| abi::ReadIn {
                fh,
                offset,
                size,
                read_flags,
                lock_owner,
                flags,
                padding,
            },
        )
}

fn write_in_with_data() -> impl Strategy<Value = (abi::WriteIn, Vec<u8>)> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..1024),
    )
        .prop_map(
            |(fh, offset, write_flags, lock_owner, flags, padding, data)| {
                (
                    abi::WriteIn {
                        fh,
                        offset,
                        size: data.len() as u32,
                        write_flags,
                        lock_owner,
                        flags,
                        padding,
                    },
                    data,
                )
            },
        )
}

fn fallocate_in() -> impl Strategy<Value = abi::FallocateIn> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(fh, offset, length, mode, padding)| abi::FallocateIn {
            fh,
            offset,
            length,
            mode,
            padding,
        })
}

/// A well-formed READ, WRITE, FALLOCATE or LOOKUP message.
fn valid_request() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u64>(), read_in()).prop_map(|(u, a)| encode_request(
            opcode::READ,
            u,
            2,
            &[a.as_bytes()]
        )),
        (any::<u64>(), write_in_with_data()).prop_map(|(u, (a, d))| encode_request(
            opcode::WRITE,
            u,
            2,
            &[a.as_bytes(), &d]
        )),
        (any::<u64>(), fallocate_in()).prop_map(|(u, a)| encode_request(
            opcode::FALLOCATE,
            u,
            2,
            &[a.as_bytes()]
        )),
        (any::<u64>(), "[a-z0-9._-]{1,64}").prop_map(|(u, name)| {
            let mut body = name.into_bytes();
            body.push(0);
            encode_request(opcode::LOOKUP, u, 1, &[&body])
        }),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR the byte at (index mod len) with a non-zero value.
    Flip(usize, u8),
    /// Keep only the first (n mod len) bytes.
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Rewrite `header.len` to match the current length (so the body
    /// checks, not the length check, see the mutated message).
    FixLen,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        2 => proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        3 => Just(Mutation::FixLen),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Flip(i, x) => {
            if !bytes.is_empty() {
                let i = i % bytes.len();
                bytes[i] ^= x;
            }
        }
        Mutation::Truncate(n) => {
            let n = n % (bytes.len() + 1);
            bytes.truncate(n);
        }
        Mutation::Extend(extra) => bytes.extend_from_slice(extra),
        Mutation::FixLen => {
            if bytes.len() >= 4 {
                let len = bytes.len() as u32;
                bytes[..4].copy_from_slice(&len.to_ne_bytes());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(2000)))]

    /// (a) Arbitrary bytes never make the parser panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..=4096)) {
        check(&bytes);
    }

    /// (a') The same, with the length field made consistent so the parse
    /// goes past the length check.
    #[test]
    fn arbitrary_bytes_with_a_consistent_length_never_panic(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..=4096)
    ) {
        if bytes.len() >= 4 {
            let len = bytes.len() as u32;
            bytes[..4].copy_from_slice(&len.to_ne_bytes());
        }
        check(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(1000)))]

    /// (b) A valid header with a known opcode and any body: no panic, and
    /// an accepted message has `header.len` equal to its length.
    #[test]
    fn valid_header_random_body(
        op in proptest::sample::select(KNOWN_OPCODES),
        unique in any::<u64>(),
        nodeid in any::<u64>(),
        ids in any::<(u32, u32, u32)>(),
        body in proptest::collection::vec(any::<u8>(), 0..=256),
    ) {
        let mut bytes = header_bytes(op, unique, nodeid, ids, body.len());
        bytes.extend_from_slice(&body);
        check(&bytes);
        match parse_request(&bytes) {
            Ok(request) => {
                prop_assert_eq!(request.header.len as usize, bytes.len());
                prop_assert_eq!(request.header.opcode, op);
                prop_assert_eq!(request.header.unique, unique);
                prop_assert_eq!(request.header.nodeid, nodeid);
                prop_assert_eq!((request.header.uid, request.header.gid, request.header.pid), ids);
            }
            Err(e) => {
                // The header was sound, so it is kept for the error reply.
                prop_assert_eq!(e.header.map(|h| h.unique), Some(unique));
            }
        }
    }

    /// (c) A valid request mutated by flips, truncation and extension.
    #[test]
    fn mutated_valid_requests_never_panic(
        original in valid_request(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        prop_assert!(parse_request(&original).is_ok());
        let mut bytes = original;
        for m in &mutations {
            apply(&mut bytes, m);
            check(&bytes);
        }
    }

    /// (d) Arbitrary replies never make the reply parser panic.
    #[test]
    fn parse_reply_never_panics(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..=512),
        fix_len in any::<bool>(),
    ) {
        if fix_len && bytes.len() >= 4 {
            let len = bytes.len() as u32;
            bytes[..4].copy_from_slice(&len.to_ne_bytes());
        }
        if let Ok(reply) = parse_reply(&bytes) {
            prop_assert!(bytes.len() >= 16);
            match reply.result {
                Ok(payload) => prop_assert_eq!(payload.len(), bytes.len() - 16),
                Err(errno) => {
                    prop_assert!((1..=511).contains(&errno));
                    prop_assert_eq!(bytes.len(), 16);
                }
            }
        }
    }

    /// (e) encode_request then parse_request gives back the READ.
    #[test]
    fn read_round_trip(unique in any::<u64>(), nodeid in any::<u64>(), arg in read_in()) {
        let bytes = encode_request(opcode::READ, unique, nodeid, &[arg.as_bytes()]);
        let request = parse_request(&bytes).unwrap();
        prop_assert_eq!(request.header.unique, unique);
        prop_assert_eq!(request.header.nodeid, nodeid);
        prop_assert_eq!(request.operation, Operation::Read(arg));
    }

    /// (e) ... the WRITE and its data.
    #[test]
    fn write_round_trip(unique in any::<u64>(), (arg, data) in write_in_with_data()) {
        let bytes = encode_request(opcode::WRITE, unique, 2, &[arg.as_bytes(), &data]);
        let request = parse_request(&bytes).unwrap();
        prop_assert_eq!(request.header.unique, unique);
        prop_assert_eq!(request.operation, Operation::Write { arg, data: &data });
    }

    /// (e) ... the FALLOCATE.
    #[test]
    fn fallocate_round_trip(unique in any::<u64>(), arg in fallocate_in()) {
        let bytes = encode_request(opcode::FALLOCATE, unique, 2, &[arg.as_bytes()]);
        let request = parse_request(&bytes).unwrap();
        prop_assert_eq!(request.header.unique, unique);
        prop_assert_eq!(request.operation, Operation::Fallocate(arg));
    }
}
