//! Malformed requests: every one is an `Err` with the right kind, and the
//! header is kept wherever it was sound, so that the engine can answer.

use fuse_blk_proto::abi::{self, opcode, InHeader};
use fuse_blk_proto::client::encode_request;
use fuse_blk_proto::{parse_request, Operation, ParseError, ParseErrorKind};
use zerocopy::IntoBytes;

const HEADER: usize = std::mem::size_of::<InHeader>();

/// A message whose header claims exactly the bytes given.
fn message(opcode: u32, body: &[u8]) -> Vec<u8> {
    encode_request(opcode, 0x55, 2, &[body])
}

fn header_of(bytes: &[u8]) -> InHeader {
    let mut header = InHeader::default();
    header.as_mut_bytes().copy_from_slice(&bytes[..HEADER]);
    header
}

fn expect_err(bytes: &[u8]) -> ParseError {
    match parse_request(bytes) {
        Ok(request) => panic!("accepted a malformed message: {request:?}"),
        Err(e) => {
            // Display never panics either.
            let _ = e.to_string();
            e
        }
    }
}

#[test]
fn short_header() {
    let full = message(opcode::STATFS, &[]);
    for len in 0..HEADER {
        let e = expect_err(&full[..len]);
        assert_eq!(e.kind, ParseErrorKind::ShortHeader, "{len} bytes");
        assert_eq!(e.header, None);
    }
    assert!(parse_request(&full).is_ok());
}

#[test]
fn header_len_larger_than_the_buffer() {
    let mut bytes = message(opcode::STATFS, &[]);
    bytes[..4].copy_from_slice(&41u32.to_ne_bytes());
    let e = expect_err(&bytes);
    assert_eq!(
        e.kind,
        ParseErrorKind::LengthMismatch {
            header_len: 41,
            received: 40
        }
    );
    bytes[..4].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(matches!(
        expect_err(&bytes).kind,
        ParseErrorKind::LengthMismatch {
            header_len: u32::MAX,
            received: 40
        }
    ));
}

#[test]
fn header_len_smaller_than_the_buffer() {
    // A READ whose header covers only the header itself.
    let mut bytes = message(opcode::READ, abi::ReadIn::default().as_bytes());
    bytes[..4].copy_from_slice(&40u32.to_ne_bytes());
    assert_eq!(
        expect_err(&bytes).kind,
        ParseErrorKind::LengthMismatch {
            header_len: 40,
            received: 80
        }
    );
    for lie in [0u32, 1, 39, 79] {
        bytes[..4].copy_from_slice(&lie.to_ne_bytes());
        assert!(matches!(
            expect_err(&bytes).kind,
            ParseErrorKind::LengthMismatch { .. }
        ));
    }
}

/// Every opcode that carries a fixed structure, with that structure's size
/// (the minimum the parser must insist on).
const STRUCTS: &[(u32, usize)] = &[
    (opcode::INIT, 16), // the pre-7.36 layout is the minimum
    (opcode::INTERRUPT, 8),
    (opcode::FORGET, 8),
    (opcode::BATCH_FORGET, 8),
    (opcode::GETATTR, 16),
    (opcode::SETATTR, 88),
    (opcode::OPEN, 8),
    (opcode::OPENDIR, 8),
    (opcode::READ, 40),
    (opcode::READDIR, 40),
    (opcode::READDIRPLUS, 40),
    (opcode::WRITE, 40),
    (opcode::RELEASE, 24),
    (opcode::RELEASEDIR, 24),
    (opcode::FSYNC, 16),
    (opcode::FSYNCDIR, 16),
    (opcode::FLUSH, 24),
    (opcode::FALLOCATE, 32),
    (opcode::ACCESS, 8),
];

#[test]
fn body_shorter_than_the_structure() {
    for &(op, size) in STRUCTS {
        for got in 0..size {
            let bytes = message(op, &vec![0u8; got]);
            let e = expect_err(&bytes);
            assert_eq!(
                e.kind,
                ParseErrorKind::ShortBody {
                    opcode: op,
                    needed: size,
                    got
                },
                "opcode {op}, {got} bytes"
            );
            assert_eq!(e.header, Some(header_of(&bytes)), "opcode {op}");
        }
    }
}

#[test]
fn body_of_exactly_the_structure_is_accepted() {
    for &(op, size) in STRUCTS {
        let bytes = message(op, &vec![0u8; size]);
        let request = parse_request(&bytes).unwrap_or_else(|e| panic!("opcode {op}: {e}"));
        assert_eq!(request.header.opcode, op);
    }
}

#[test]
fn write_size_larger_than_the_data() {
    let arg = abi::WriteIn {
        size: 9,
        ..Default::default()
    };
    let bytes = encode_request(opcode::WRITE, 1, 2, &[arg.as_bytes(), &[0; 8]]);
    let e = expect_err(&bytes);
    assert_eq!(
        e.kind,
        ParseErrorKind::WriteSizeMismatch { size: 9, data: 8 }
    );
    assert_eq!(e.header, Some(header_of(&bytes)));

    let arg = abi::WriteIn {
        size: u32::MAX,
        ..Default::default()
    };
    let bytes = encode_request(opcode::WRITE, 1, 2, &[arg.as_bytes()]);
    assert_eq!(
        expect_err(&bytes).kind,
        ParseErrorKind::WriteSizeMismatch {
            size: u32::MAX,
            data: 0
        }
    );
}

#[test]
fn write_size_smaller_than_the_data() {
    let arg = abi::WriteIn {
        size: 7,
        ..Default::default()
    };
    let bytes = encode_request(opcode::WRITE, 1, 2, &[arg.as_bytes(), &[0; 8]]);
    let e = expect_err(&bytes);
    assert_eq!(
        e.kind,
        ParseErrorKind::WriteSizeMismatch { size: 7, data: 8 }
    );
    assert_eq!(e.header, Some(header_of(&bytes)));

    let arg = abi::WriteIn::default();
    let bytes = encode_request(opcode::WRITE, 1, 2, &[arg.as_bytes(), &[0; 1]]);
    assert_eq!(
        expect_err(&bytes).kind,
        ParseErrorKind::WriteSizeMismatch { size: 0, data: 1 }
    );
}

#[test]
fn write_of_zero_bytes_is_well_formed() {
    let bytes = encode_request(opcode::WRITE, 1, 2, &[abi::WriteIn::default().as_bytes()]);
    let request = parse_request(&bytes).unwrap();
    assert!(matches!(
        request.operation,
        Operation::Write { data: [], .. }
    ));
}

#[test]
fn lookup_bad_names() {
    for body in [
        &b"disk"[..], // no NUL
        b"",          // nothing at all
        b"\0",        // empty name
        b"\0disk\0",  // empty name followed by bytes
        b"a/b\0",     // slash inside
        b"/\0",       // slash only
        b"disk/\0",   // trailing slash
    ] {
        let bytes = message(opcode::LOOKUP, body);
        let e = expect_err(&bytes);
        assert_eq!(e.kind, ParseErrorKind::BadName, "{body:?}");
        assert_eq!(e.header, Some(header_of(&bytes)));
    }
}

#[test]
fn lookup_name_ends_at_the_first_nul() {
    let bytes = message(opcode::LOOKUP, b"disk\0junk/\0");
    assert_eq!(
        parse_request(&bytes).unwrap().operation,
        Operation::Lookup { name: b"disk" }
    );
}

#[test]
fn batch_forget_count_larger_than_the_entries() {
    for (count, entries) in [(1u32, 0usize), (2, 1), (3, 2), (u32::MAX, 1)] {
        let mut body = abi::BatchForgetIn { count, dummy: 0 }.as_bytes().to_vec();
        for i in 0..entries {
            body.extend_from_slice(
                abi::ForgetOne {
                    nodeid: i as u64 + 2,
                    nlookup: 1,
                }
                .as_bytes(),
            );
        }
        let bytes = message(opcode::BATCH_FORGET, &body);
        let e = expect_err(&bytes);
        assert!(
            matches!(e.kind, ParseErrorKind::ShortBody { opcode: opcode::BATCH_FORGET, got, .. } if got == body.len()),
            "count {count}, {entries} entries: {e:?}"
        );
        assert_eq!(e.header, Some(header_of(&bytes)));
    }
    // A partial trailing entry does not count.
    let mut body = abi::BatchForgetIn { count: 1, dummy: 0 }
        .as_bytes()
        .to_vec();
    body.extend_from_slice(&[0; 15]);
    assert!(matches!(
        expect_err(&message(opcode::BATCH_FORGET, &body)).kind,
        ParseErrorKind::ShortBody {
            needed: 24,
            got: 23,
            ..
        }
    ));
    // Zero entries with count zero is fine.
    let body = abi::BatchForgetIn::default();
    assert_eq!(
        parse_request(&message(opcode::BATCH_FORGET, body.as_bytes()))
            .unwrap()
            .operation,
        Operation::BatchForget { count: 0 }
    );
}

#[test]
fn unknown_opcode_keeps_the_header() {
    for op in [
        9999u32,
        0,
        7,
        19,
        48,
        49,
        opcode::NOTIFY_REPLY,
        53,
        4096,
        u32::MAX,
    ] {
        let bytes = message(op, &[1, 2, 3]);
        let e = expect_err(&bytes);
        assert_eq!(e.kind, ParseErrorKind::UnknownOpcode(op));
        let header = e.header.expect("header kept");
        assert_eq!(header, header_of(&bytes));
        assert_eq!(header.unique, 0x55);
        assert_eq!(header.opcode, op);
    }
}

#[test]
fn known_but_unsupported_opcodes_parse_without_a_body_check() {
    for op in [
        opcode::READLINK,
        opcode::SYMLINK,
        opcode::MKNOD,
        opcode::MKDIR,
        opcode::UNLINK,
        opcode::RMDIR,
        opcode::RENAME,
        opcode::LINK,
        opcode::SETXATTR,
        opcode::GETXATTR,
        opcode::LISTXATTR,
        opcode::REMOVEXATTR,
        opcode::GETLK,
        opcode::SETLK,
        opcode::SETLKW,
        opcode::CREATE,
        opcode::BMAP,
        opcode::IOCTL,
        opcode::POLL,
        opcode::RENAME2,
        opcode::LSEEK,
        opcode::COPY_FILE_RANGE,
        opcode::SYNCFS,
        opcode::TMPFILE,
        opcode::STATX,
    ] {
        for body in [&[][..], &[0xff; 3][..]] {
            let bytes = message(op, body);
            let request = parse_request(&bytes).unwrap();
            assert_eq!(request.operation, Operation::Unsupported(op));
            assert!(request.expects_reply());
        }
    }
}

#[test]
fn header_only_opcodes_ignore_trailing_bytes() {
    // DESTROY and STATFS carry no argument; extra bytes are not an error.
    for op in [opcode::DESTROY, opcode::STATFS] {
        assert!(parse_request(&message(op, &[0; 8])).is_ok());
    }
}
