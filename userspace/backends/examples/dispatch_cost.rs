//! What the session engine costs per request, without a kernel: 4 KiB
//! READs (or WRITEs) handed to `Session::dispatch` against `NullDevice`,
//! replies dropped by a sink that makes no system call. Used to measure the
//! engine's own work (Documentation/BENCHMARKS.md, "Engine cost"):
//!
//!     cargo build --release --example dispatch_cost
//!     valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!         target/release/examples/dispatch_cost read 100000
//!
//! Instructions per request are the difference between two runs of
//! different counts divided by the difference of the counts, which takes
//! out the setup. Without valgrind it prints nanoseconds per request.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Instant;

use fuse_blk::{Channel, ReplySink, Session, SessionConfig};
use fuse_blk_backends::NullDevice;
use fuse_blk_proto::abi::{opcode, ReadIn, WriteIn};
use fuse_blk_proto::client::encode_request;
use zerocopy::IntoBytes;

/// Drops every reply: the figure is the engine's, not a channel's.
struct Discard;

impl ReplySink for Discard {
    fn send_reply(&self, parts: &[IoSlice<'_>]) {
        std::hint::black_box(parts);
    }
}

impl Channel for Discard {
    fn receive(&self, _buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(None)
    }

    fn send(&self, parts: &[IoSlice<'_>]) -> io::Result<()> {
        self.send_reply(parts);
        Ok(())
    }
}

const BLOCK: u32 = 4096;
const DEVICE_SIZE: u64 = 1 << 30;

fn message(write: bool, index: u64) -> Vec<u8> {
    let offset = (index * u64::from(BLOCK)) % DEVICE_SIZE;
    if write {
        let arg = WriteIn {
            offset,
            size: BLOCK,
            ..WriteIn::default()
        };
        encode_request(
            opcode::WRITE,
            index + 1,
            2,
            &[arg.as_bytes(), &[0x5a; BLOCK as usize]],
        )
    } else {
        let arg = ReadIn {
            offset,
            size: BLOCK,
            ..ReadIn::default()
        };
        encode_request(opcode::READ, index + 1, 2, &[arg.as_bytes()])
    }
}

#[inline(never)]
fn run(session: &Session, channel: &Arc<dyn Channel>, messages: &[Vec<u8>], count: u64) {
    for index in 0..count {
        let message = &messages[index as usize % messages.len()];
        assert!(session.dispatch(0, message, channel));
    }
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: dispatch_cost read|write [COUNT]";
    let write = match args.next().as_deref() {
        Some("read") => false,
        Some("write") => true,
        _ => return Err(usage.into()),
    };
    let count: u64 = match args.next() {
        Some(text) => text.parse().map_err(|_| usage.to_owned())?,
        None => 1_000_000,
    };
    let device = Arc::new(NullDevice::new(DEVICE_SIZE, 512));
    let session = Session::new(device, SessionConfig::default()).map_err(|e| e.to_string())?;
    let channel: Arc<dyn Channel> = Arc::new(Discard);
    // A few distinct messages, built before the clock starts.
    let messages: Vec<Vec<u8>> = (0..64).map(|index| message(write, index)).collect();
    let start = Instant::now();
    run(&session, &channel, &messages, count);
    let elapsed = start.elapsed();
    println!(
        "{} {count} x 4 KiB: {:.1} ns per request",
        if write { "write" } else { "read" },
        elapsed.as_nanos() as f64 / count as f64
    );
    Ok(())
}
