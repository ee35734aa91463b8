//! An existing `fuser::Filesystem` served, unchanged, as a block device on
//! the stock path through the fuser adapter.

use std::sync::Arc;

use fuse_blk_fuser::{FuserDevice, FuserOptions};
use fuse_blk_loop::{StockDevice, StockOptions};
use fuse_blk_tests::image_fs::ImageFs;
use fuse_blk_tests::{assert_root, random_bytes, read_at, sh, write_at, TempDir};

const SIZE: usize = 64 << 20;

#[test]
fn a_fuser_filesystem_serves_a_block_device() {
    assert_root();
    let (fs, image) = ImageFs::new(SIZE);
    let device = FuserDevice::new(fs, FuserOptions::new("disk.img")).expect("adapter");
    let run = TempDir::new("fuser-run");
    let stock = StockDevice::attach(
        Arc::new(device),
        &StockOptions {
            mountpoint: run.join("mnt"),
            name: "fuser-test".into(),
            threads: 2,
            io: Default::default(),
            passthrough: true,
            ring_poll: fuse_blk::DEFAULT_RING_POLL,
        },
    )
    .expect("attach");
    let path = stock.device_path().to_owned();

    let data = random_bytes(11, 4 << 20);
    write_at(&path, 1 << 20, &data).unwrap();
    assert_eq!(read_at(&path, 1 << 20, data.len()), data);
    // The bytes landed in the fuser filesystem's file.
    assert_eq!(
        image.lock().unwrap()[1 << 20..(1 << 20) + data.len()],
        data[..]
    );

    sh(
        "blkdiscard",
        &[
            "-z",
            "--offset",
            "1048576",
            "--length",
            "1048576",
            path.to_str().unwrap(),
        ],
    );
    assert!(read_at(&path, 1 << 20, 1 << 20).iter().all(|&b| b == 0));

    sh("mkfs.ext4", &["-q", path.to_str().unwrap()]);
    sh("e2fsck", &["-fn", path.to_str().unwrap()]);

    stock.detacher().detach().expect("detach");
    stock.wait().expect("session ends cleanly");
    assert!(!run.join("mnt").exists(), "mount point removed");
}
