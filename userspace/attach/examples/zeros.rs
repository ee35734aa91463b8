//! The smallest block device: 1 GiB that reads as zeros and forgets every
//! write. As root: `cargo run --example zeros`; it prints the device's
//! path (`/dev/loopN` on a stock kernel, `/dev/fuseblkN` with the fuse-blk
//! module) and serves until Ctrl-C, which detaches it.

use std::sync::Arc;

use fuse_blk_attach::{AttachOptions, BlockDevice, Geometry, ReplyData, ReplyWrite, Request};

struct Zeros;

impl BlockDevice for Zeros {
    // Asked once, before the first request: size and block size.
    fn geometry(&self) -> Geometry {
        Geometry::new(1 << 30, 4096) // 1 GiB of 4 KiB blocks
    }

    // Every read is answered, exactly once, through its reply. `zeros`
    // sends `len` zero bytes (with the module's io_uring channels the
    // kernel zeroes the pages itself and nothing is copied).
    fn read(&self, _req: &Request, _offset: u64, _len: u32, reply: ReplyData) {
        reply.zeros();
    }

    // A write that is answered `ok` counts as done; this device drops it.
    fn write(&self, _req: &Request, _offset: u64, _data: &[u8], _fua: bool, reply: ReplyWrite) {
        reply.ok();
    }
}

fn main() {
    // `attach` returns once the block device exists; the options are
    // `fuse-blk attach`'s, and the name shows in `losetup` or sysfs.
    let device = match fuse_blk_attach::attach(Arc::new(Zeros), &AttachOptions::new("zeros")) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("zeros: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", device.device_path().display());
    // Serves until Ctrl-C (or SIGTERM), then detaches the device as soon
    // as nothing has it mounted.
    if let Err(e) = device.serve_until_signal() {
        eprintln!("zeros: {e}");
        std::process::exit(1);
    }
}
