//! Real workloads on the stock path: file systems, fio with verification,
//! discard and write-zeroes, read-only devices.

use std::fs;
use std::path::Path;

use fuse_blk_tests::{fio_verify, random_bytes, read_at, sh, write_at, Instance, TempDir};

const MIB: usize = 1 << 20;

/// Makes ext4 on `device`, mounts it, writes 64 MiB of random data and
/// returns its checksum, read back through a fresh mount.
fn fill_ext4(device: &str, seed: u64) -> String {
    sh("mkfs.ext4", &["-q", "-F", device]);
    let mnt = TempDir::new("ext4");
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device, mnt_path]);
    fs::write(mnt.join("data"), random_bytes(seed, 64 * MIB)).unwrap();
    let written = sh("sha256sum", &[mnt.join("data").to_str().unwrap()]);
    sh("umount", &[mnt_path]);
    let read = checksum_on(device, &mnt);
    assert_eq!(sum_of(&written), read, "data read back differs");
    read
}

fn sum_of(sha256sum_output: &str) -> String {
    sha256sum_output
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Mounts `device`, checksums /data, unmounts.
fn checksum_on(device: &str, mnt: &TempDir) -> String {
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device, mnt_path]);
    let sum = sh("sha256sum", &[mnt.join("data").to_str().unwrap()]);
    sh("umount", &[mnt_path]);
    sum_of(&sum)
}

#[test]
fn ext4_on_a_mem_device() {
    let instance = Instance::new("ext4-mem");
    let device = instance.attach(&["mem:256M"]);
    fill_ext4(device.path_str(), 1);
    sh("e2fsck", &["-fn", device.path_str()]);
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn ext4_on_a_file_device_survives_detach_and_attach() {
    let instance = Instance::new("ext4-file");
    let dir = TempDir::new("ext4-image");
    let image = dir.sparse_image(256 * MIB as u64);
    let backend = format!("file:{}", image.display());

    let device = instance.attach(&["--block-size", "4096", &backend]);
    let sum = fill_ext4(device.path_str(), 2);
    device.detach();
    instance.assert_nothing_left();

    let device = instance.attach(&["--block-size", "4096", &backend]);
    let mnt = TempDir::new("ext4-again");
    assert_eq!(checksum_on(device.path_str(), &mnt), sum);
    sh("e2fsck", &["-fn", device.path_str()]);
    device.detach();
    // The image itself, read without fuse-blk, is a clean file system.
    sh("e2fsck", &["-fn", image.to_str().unwrap()]);
    instance.assert_nothing_left();
}

#[test]
fn fio_verifies_random_writes() {
    let instance = Instance::new("fio");
    let device = instance.attach(&["mem:128M"]);
    fio_verify(device.path_str(), "randwrite", "4k", "96M");
    fio_verify(device.path_str(), "randwrite", "64k", "96M");
    device.detach();

    let dir = TempDir::new("fio-image");
    let image = dir.sparse_image(128 * MIB as u64);
    let backend = format!("file:{}", image.display());
    // Through the kernel's passthrough (the default), then the daemon.
    for passthrough in [&[][..], &["--no-passthrough"][..]] {
        let mut args = vec!["--block-size", "4096", &backend];
        args.extend_from_slice(passthrough);
        let device = instance.attach(&args);
        fio_verify(device.path_str(), "randwrite", "4k", "96M");
        fio_verify(device.path_str(), "randrw", "64k", "96M");
        device.detach();
    }
    instance.assert_nothing_left();
}

/// Fills 8 MiB, discards (or zeroes) 2 MiB in the middle, checks that the
/// range reads zeros and the rest is intact.
fn check_zeroing(device: &Path, blkdiscard_args: &[&str]) {
    let data = random_bytes(3, 8 * MIB);
    write_at(device, 0, &data).unwrap();
    let mut args = blkdiscard_args.to_vec();
    let device_str = device.to_str().unwrap();
    args.extend_from_slice(&["--offset", "2097152", "--length", "2097152", device_str]);
    sh("blkdiscard", &args);
    let after = read_at(device, 0, 8 * MIB);
    assert!(
        after[2 * MIB..4 * MIB].iter().all(|&b| b == 0),
        "range not zeroed"
    );
    assert!(
        after[..2 * MIB] == data[..2 * MIB],
        "data before the range changed"
    );
    assert!(
        after[4 * MIB..] == data[4 * MIB..],
        "data after the range changed"
    );
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let instance = Instance::new("discard");
    let device = instance.attach(&["mem:16M"]);
    check_zeroing(&device.path, &[]);
    check_zeroing(&device.path, &["-z"]);
    device.detach();

    let dir = TempDir::new("discard-image");
    let image = dir.sparse_image(16 * MIB as u64);
    let device = instance.attach(&[&format!("file:{}", image.display())]);
    check_zeroing(&device.path, &[]);
    check_zeroing(&device.path, &["-z"]);
    device.detach();
    // The discarded range of the image became a hole.
    let image_bytes = fs::read(&image).unwrap();
    assert!(image_bytes[2 * MIB..4 * MIB].iter().all(|&b| b == 0));
    instance.assert_nothing_left();
}

#[test]
fn a_read_only_device_rejects_writes() {
    let instance = Instance::new("readonly");
    let dir = TempDir::new("ro-image");
    let image = dir.join("disk.img");
    fs::write(&image, random_bytes(4, 4 * MIB)).unwrap();
    let device = instance.attach(&["--read-only", &format!("file:{}", image.display())]);
    assert_eq!(sh("blockdev", &["--getro", device.path_str()]).trim(), "1");
    let err = write_at(&device.path, 0, &[0u8; 4096]).expect_err("write must fail");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES)
        ),
        "{err}"
    );
    assert_eq!(read_at(&device.path, 0, 4 * MIB), random_bytes(4, 4 * MIB));
    device.detach();
    assert_eq!(
        fs::read(&image).unwrap(),
        random_bytes(4, 4 * MIB),
        "image unchanged"
    );
    instance.assert_nothing_left();
}
