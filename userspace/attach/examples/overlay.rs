//! What a loop device cannot do: a writable device over an image file that
//! stays untouched. Reads of blocks never written come from the image;
//! writes are kept in memory, a block at a time (copy-on-write), and are
//! gone when the program ends. Handy to boot or fsck an image without
//! changing it.
//!
//! As root: `cargo run --example overlay -- IMAGE`; Ctrl-C detaches.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, RwLock};

use fuse_blk_attach::{
    AttachOptions, BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request,
};

/// The copy-on-write unit, and the device's block size, so that every
/// request covers whole blocks.
const BLOCK: u64 = 4096;

struct Overlay {
    image: File,
    size: u64,
    /// Blocks written since the start, by block number.
    written: RwLock<HashMap<u64, Box<[u8]>>>,
}

impl Overlay {
    fn open(path: &str) -> Result<Overlay, String> {
        // Read-only: nothing this program does can change the image.
        let image = File::open(path).map_err(|e| format!("{path}: {e}"))?;
        let size = image.metadata().map_err(|e| format!("{path}: {e}"))?.len();
        if size == 0 || size % BLOCK != 0 {
            return Err(format!(
                "{path}: {size} bytes is not a positive multiple of {BLOCK}"
            ));
        }
        Ok(Overlay {
            image,
            size,
            written: RwLock::new(HashMap::new()),
        })
    }
}

impl BlockDevice for Overlay {
    fn geometry(&self) -> Geometry {
        let mut geometry = Geometry::new(self.size, BLOCK as u32);
        geometry.features = Features {
            write_zeroes: true,
            ..Features::default()
        };
        geometry
    }

    fn read(&self, _req: &Request, offset: u64, _len: u32, reply: ReplyData) {
        let written = self.written.read().unwrap();
        // `fill` hands us the reply's buffer (the kernel's, where it can)
        // to fill block by block: from memory if written, else the image.
        reply.fill(|buf| {
            for (i, chunk) in buf.chunks_mut(BLOCK as usize).enumerate() {
                let at = offset + i as u64 * BLOCK;
                match written.get(&(at / BLOCK)) {
                    Some(block) => chunk.copy_from_slice(block),
                    None => self.image.read_exact_at(chunk, at)?,
                }
            }
            Ok(())
        });
    }

    fn write(&self, _req: &Request, offset: u64, data: &[u8], _fua: bool, reply: ReplyWrite) {
        let mut written = self.written.write().unwrap();
        for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
            written.insert(offset / BLOCK + i as u64, chunk.into());
        }
        reply.ok();
    }

    // On a stock kernel discards arrive here too (as punched holes, which
    // must read back as zeros): zero blocks hide the image's.
    fn write_zeroes(&self, _req: &Request, offset: u64, len: u64, _unmap: bool, reply: ReplyEmpty) {
        let mut written = self.written.write().unwrap();
        for block in offset / BLOCK..(offset + len) / BLOCK {
            written.insert(block, vec![0; BLOCK as usize].into());
        }
        reply.ok();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image] = args.as_slice() else {
        eprintln!("usage: overlay IMAGE");
        std::process::exit(2);
    };
    let overlay = match Overlay::open(image) {
        Ok(overlay) => overlay,
        Err(e) => {
            eprintln!("overlay: {e}");
            std::process::exit(1);
        }
    };
    let device = match fuse_blk_attach::attach(Arc::new(overlay), &AttachOptions::new("overlay")) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("overlay: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", device.device_path().display());
    if let Err(e) = device.serve_until_signal() {
        eprintln!("overlay: {e}");
        std::process::exit(1);
    }
}
