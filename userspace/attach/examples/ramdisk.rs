//! A RAM disk: blocks kept in memory for as long as the program runs.
//! As root: `cargo run --example ramdisk [SIZE_MIB]` (default 64), then
//! e.g. `mkfs.ext4 /dev/loopN`; Ctrl-C detaches it and the data is gone.

use std::sync::{Arc, RwLock};

use fuse_blk_attach::{
    AttachOptions, BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request,
};

const BLOCK_SIZE: u32 = 4096;

struct RamDisk {
    // One lock for all of it keeps the example short; readers share it.
    // (The `mem:` backend of `fuse-blk attach` is the scalable version:
    // sparse pages, memory given back on discard.)
    bytes: RwLock<Vec<u8>>,
}

impl BlockDevice for RamDisk {
    fn geometry(&self) -> Geometry {
        let size = self.bytes.read().unwrap().len() as u64;
        let mut geometry = Geometry::new(size, BLOCK_SIZE);
        // Optional operations are sent only to devices that ask for them.
        geometry.features = Features {
            discard: true,
            write_zeroes: true,
            ..Features::default()
        };
        geometry
    }

    // Offsets and lengths are checked by the engine before they get here:
    // whole blocks, inside the device.
    fn read(&self, _req: &Request, offset: u64, len: u32, reply: ReplyData) {
        let bytes = self.bytes.read().unwrap();
        let start = offset as usize;
        reply.data(&bytes[start..start + len as usize]);
    }

    fn write(&self, _req: &Request, offset: u64, data: &[u8], _fua: bool, reply: ReplyWrite) {
        let mut bytes = self.bytes.write().unwrap();
        let start = offset as usize;
        bytes[start..start + data.len()].copy_from_slice(data);
        reply.ok();
    }

    // Memory does not need flushing: the default `flush` answers ok.

    // A discarded range may read back as anything; zeros it is.
    fn discard(&self, req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        self.write_zeroes(req, offset, len, true, reply);
    }

    fn write_zeroes(&self, _req: &Request, offset: u64, len: u64, _unmap: bool, reply: ReplyEmpty) {
        let mut bytes = self.bytes.write().unwrap();
        bytes[offset as usize..(offset + len) as usize].fill(0);
        reply.ok();
    }
}

fn main() {
    let size_mib: u64 = match std::env::args().nth(1) {
        None => 64,
        Some(arg) => match arg.parse() {
            Ok(mib) if mib > 0 => mib,
            _ => {
                eprintln!("ramdisk: size {arg:?} is not a positive number of MiB");
                std::process::exit(2);
            }
        },
    };
    // Asked for up front, so that too large a size is a clear error and
    // not an abort at the first write.
    let mut bytes = Vec::new();
    let size = usize::try_from(size_mib)
        .ok()
        .and_then(|mib| mib.checked_mul(1 << 20));
    if size.is_none_or(|size| bytes.try_reserve_exact(size).is_err()) {
        eprintln!("ramdisk: cannot allocate {size_mib} MiB");
        std::process::exit(1);
    }
    bytes.resize(size.unwrap_or(0), 0);
    let disk = RamDisk {
        bytes: RwLock::new(bytes),
    };
    let device = match fuse_blk_attach::attach(Arc::new(disk), &AttachOptions::new("ramdisk")) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("ramdisk: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", device.device_path().display());
    if let Err(e) = device.serve_until_signal() {
        eprintln!("ramdisk: {e}");
        std::process::exit(1);
    }
}
