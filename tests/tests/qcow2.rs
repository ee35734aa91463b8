//! qcow2 images end to end on the stock path: `fuse-blk attach qcow2:PATH`
//! under fio verify, ext4 and xfs, over a raw base that must stay unchanged;
//! `qemu-img check` of the image after every detach; bad images refused
//! in one line, leaving nothing behind.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fuse_blk_qcow2::testutil::{compressed_in, parse_map, MapExtent};
use fuse_blk_tests::{fio_verify, random_bytes, read_at, sh, write_at, Instance, TempDir};

const MIB: usize = 1 << 20;

/// `qemu-img check`: exit 0 means no corruption and no leaks.
fn assert_clean(image: &Path) {
    sh("qemu-img", &["check", image.to_str().unwrap()]);
}

fn sha256(path: &Path) -> String {
    sh("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn fio_and_ext4_on_an_overlay_over_a_raw_base() {
    let instance = Instance::new("qcow2-overlay");
    let dir = TempDir::new("qcow2-overlay");
    let base = dir.join("base.raw");
    fs::write(&base, random_bytes(11, 128 * MIB)).unwrap();
    let base_sum = sha256(&base);
    let overlay = dir.join("overlay.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ],
    );
    let backend = format!("qcow2:{}", overlay.display());

    // Caches of two tables each: fio makes them evict and write back.
    let device = instance.attach(&[
        "--block-size",
        "4096",
        "--qcow2-l2-cache",
        "128K",
        "--qcow2-refcount-cache",
        "128K",
        &backend,
    ]);
    // Unwritten blocks come from the base.
    assert!(
        read_at(&device.path, 100 * MIB as u64, MIB)
            == random_bytes(11, 128 * MIB)[100 * MIB..101 * MIB],
        "the overlay does not read the base"
    );
    fio_verify(device.path_str(), "randwrite", "4k", "96M");
    fio_verify(device.path_str(), "randrw", "64k", "96M");
    // Punched (stock path: write-zeroes) ranges read as zeros, not as the base.
    let data = random_bytes(12, 4 * MIB);
    write_at(&device.path, 0, &data).unwrap();
    sh(
        "blkdiscard",
        &[
            "--offset",
            "1048576",
            "--length",
            "2097152",
            device.path_str(),
        ],
    );
    let after = read_at(&device.path, 0, 4 * MIB);
    assert!(after[MIB..3 * MIB].iter().all(|&b| b == 0), "not zeroed");
    assert!(after[..MIB] == data[..MIB] && after[3 * MIB..] == data[3 * MIB..]);
    device.detach();
    assert_clean(&overlay);
    assert_eq!(sha256(&base), base_sum, "the base was written");

    // ext4, written, detached, attached again: the same data, fsck clean.
    let device = instance.attach(&["--block-size", "4096", &backend]);
    sh("mkfs.ext4", &["-q", "-F", device.path_str()]);
    let mnt = TempDir::new("qcow2-mnt");
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device.path_str(), mnt_path]);
    fs::write(mnt.join("data"), random_bytes(13, 48 * MIB)).unwrap();
    let written = sha256(&mnt.join("data"));
    sh("umount", &[mnt_path]);
    device.detach();
    assert_clean(&overlay);

    let device = instance.attach(&["--block-size", "4096", &backend]);
    sh("e2fsck", &["-fn", device.path_str()]);
    sh("mount", &[device.path_str(), mnt_path]);
    assert_eq!(sha256(&mnt.join("data")), written);
    sh("umount", &[mnt_path]);
    device.detach();
    assert_clean(&overlay);
    assert_eq!(sha256(&base), base_sum, "the base was written");
    instance.assert_nothing_left();
}

/// xfs on an overlay larger than its base (xfs wants 300 MiB at least):
/// written, detached, attached again, xfs_repair clean, the same data.
#[test]
fn xfs_on_an_overlay_larger_than_its_base() {
    let instance = Instance::new("qcow2-xfs");
    let dir = TempDir::new("qcow2-xfs");
    let base = dir.join("base.raw");
    fs::write(&base, random_bytes(31, 64 * MIB)).unwrap();
    let base_sum = sha256(&base);
    let overlay = dir.join("overlay.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
            "512M",
        ],
    );
    let backend = format!("qcow2:{}", overlay.display());
    let device = instance.attach(&["--block-size", "4096", &backend]);
    sh("mkfs.xfs", &["-q", "-f", device.path_str()]);
    let mnt = TempDir::new("qcow2-xfs-mnt");
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device.path_str(), mnt_path]);
    fs::write(mnt.join("data"), random_bytes(32, 48 * MIB)).unwrap();
    let written = sha256(&mnt.join("data"));
    sh("umount", &[mnt_path]);
    device.detach();
    assert_clean(&overlay);

    let device = instance.attach(&["--block-size", "4096", &backend]);
    sh("xfs_repair", &["-n", device.path_str()]);
    sh("mount", &[device.path_str(), mnt_path]);
    assert_eq!(sha256(&mnt.join("data")), written);
    sh("umount", &[mnt_path]);
    device.detach();
    assert_clean(&overlay);
    assert_eq!(sha256(&base), base_sum, "the base was written");
    instance.assert_nothing_left();
}

/// A dirty image (qemu-io killed while writing with lazy refcounts): a
/// read-only attach serves it unchanged; a writable one rebuilds its
/// refcounts, and `qemu-img check` is clean after the detach.
#[test]
fn dirty_image_read_only_then_repaired() {
    let instance = Instance::new("qcow2-dirty");
    let dir = TempDir::new("qcow2-dirty");
    let image = dir.join("dirty.qcow2");
    let path = image.to_str().unwrap();
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            path,
            "16M",
        ],
    );
    let killed = Command::new("qemu-io")
        .args(["-c", "write -P 0x5c 0 1M", "-c", "sigraise 9", path])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(!killed.success());
    let bytes = fs::read(&image).unwrap();
    assert_eq!(bytes[79] & 1, 1, "not dirty");
    let backend = format!("qcow2:{}", image.display());

    let device = instance.attach(&["--read-only", &backend]);
    assert_eq!(sh("blockdev", &["--getro", device.path_str()]).trim(), "1");
    assert_eq!(read_at(&device.path, 0, MIB), vec![0x5c; MIB]);
    device.detach();
    assert!(
        fs::read(&image).unwrap() == bytes,
        "a read-only attach wrote"
    );

    let device = instance.attach(&[&backend]);
    write_at(&device.path, 4 * MIB as u64, &random_bytes(40, MIB)).unwrap();
    assert_eq!(read_at(&device.path, 0, MIB), vec![0x5c; MIB]);
    device.detach();
    assert_clean(&image);
    instance.assert_nothing_left();
}

#[test]
fn bad_images_are_one_line_errors_leaving_nothing() {
    let instance = Instance::new("qcow2-bad");
    let dir = TempDir::new("qcow2-bad");
    let text = dir.join("text.img");
    fs::write(&text, vec![b'x'; 65536]).unwrap();
    let base = dir.join("base.raw");
    fs::write(&base, vec![0; MIB]).unwrap();
    let overlay = dir.join("overlay.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            overlay.to_str().unwrap(),
        ],
    );
    fs::remove_file(&base).unwrap();
    let overlay_sum = sha256(&overlay);
    let cases = [
        (
            format!("qcow2:{}", text.display()),
            format!("{}: not a qcow2 image (no QFI\\xfb magic)", text.display()),
        ),
        (
            format!("qcow2:{}", overlay.display()),
            format!(
                "{}: backing file {}: No such file or directory",
                overlay.display(),
                base.display()
            ),
        ),
        (
            format!("qcow2:{}", dir.join("none.qcow2").display()),
            format!(
                "{}: No such file or directory",
                dir.join("none.qcow2").display()
            ),
        ),
        ("qcow2:".to_owned(), "qcow2: needs a path".to_owned()),
    ];
    for (backend, message) in cases {
        let out = instance.run(["attach", &backend]);
        assert!(!out.status.success(), "{backend} attached");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            format!("fuse-blk: {message}"),
            "{backend}"
        );
        instance.assert_nothing_left();
    }
    assert_eq!(sha256(&overlay), overlay_sum, "a refused attach wrote");
}

/// `qemu-img check` after a crash: leaks (exit 3) are allowed, corruption
/// (exit 2) is not.
fn assert_no_corruption(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", image.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 3)) && !stdout.contains("ERROR"),
        "qemu-img check after kill -9 (exit {:?}): {stdout}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kill -9 of the daemon in the middle of a fio write load, three times:
/// each time `qemu-img check` finds no corruption, and the data a flush
/// acknowledged before the load is there when the image is attached again.
#[test]
fn kill_9_under_fio_load_leaves_leaks_at_most() {
    kill_9_under_fio_load("qcow2-kill", &[], &[]);
}

/// The same with `--qcow2-compress` and fio's buffers half compressible:
/// its 4 KiB writes fill whole clusters, most of them stored compressed.
#[test]
fn kill_9_under_compressed_writes_leaves_leaks_at_most() {
    kill_9_under_fio_load(
        "qcow2-kill-compressed",
        &["--qcow2-compress"],
        &["--buffer_compress_percentage=50", "--refill_buffers"],
    );
}

fn kill_9_under_fio_load(label: &str, attach_args: &[&str], fio_args: &[&str]) {
    let instance = Instance::new(label);
    let dir = TempDir::new(label);
    let image = dir.join("crash.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            image.to_str().unwrap(),
            "128M",
        ],
    );
    let backend = format!("qcow2:{}", image.display());
    for round in 0..3u64 {
        let mut args = vec!["--block-size", "4096"];
        args.extend_from_slice(attach_args);
        args.push(&backend);
        let device = instance.attach(&args);
        write_at(
            &device.path,
            round * 8 * MIB as u64,
            &random_bytes(20 + round, 4 * MIB),
        )
        .unwrap();
        let mut fio = Command::new("fio")
            .args([
                "--name=load",
                &format!("--filename={}", device.path_str()),
                "--ioengine=libaio",
                "--direct=1",
                "--iodepth=16",
                "--rw=randwrite",
                "--bs=4k",
                "--offset=64M",
                "--size=64M",
                "--time_based",
                "--runtime=60",
                // Flushes, so that metadata is being written at the kill.
                "--fsync=16",
            ])
            .args(fio_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("fio");
        // Long enough for allocations, flushes by the kernel and cache
        // write-backs to be under way; how far they got does not matter.
        std::thread::sleep(Duration::from_millis(1500));
        for pid in instance.daemons() {
            // SAFETY: kill has no memory preconditions.
            assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !instance.daemons().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(instance.daemons().is_empty(), "the daemon survived SIGKILL");
        let _ = fio.kill();
        let _ = fio.wait();
        device.detach();
        assert_no_corruption(&image);
        // Leaks repaired, so that each round starts from a clean image.
        let _ = Command::new("qemu-img")
            .args(["check", "-q", "-r", "leaks", image.to_str().unwrap()])
            .status();
        assert_clean(&image);
    }
    if attach_args.contains(&"--qcow2-compress") {
        let map = qemu_map(&image);
        assert!(
            map.iter().any(|e| e.2),
            "nothing stored compressed: {map:?}"
        );
    }
    let device = instance.attach(&["--block-size", "4096", "--read-only", &backend]);
    for round in 0..3u64 {
        assert!(
            read_at(&device.path, round * 8 * MIB as u64, 4 * MIB)
                == random_bytes(20 + round, 4 * MIB),
            "round {round}: flushed data lost"
        );
    }
    device.detach();
    instance.assert_nothing_left();
}

/// `qemu-img map --output=json`: (start, length, compressed) of each
/// extent.
fn qemu_map(image: &Path) -> Vec<MapExtent> {
    parse_map(&sh(
        "qemu-img",
        &["map", "--output=json", image.to_str().unwrap()],
    ))
}

/// `qemu-img compare` of the image against a raw file holding `model`.
fn assert_same(image: &Path, model: &[u8]) {
    let raw = image.with_extension("model.raw");
    fs::write(&raw, model).unwrap();
    sh(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    fs::remove_file(raw).unwrap();
}

/// Text-like data: compresses well, unlike `random_bytes`.
fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 64);
    let mut line = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!("line {line}: the quick brown fox, {}\n", line % 97).as_bytes(),
        );
        line += 1;
    }
    out.truncate(len);
    out
}

/// dd of a file to `device` at `offset`, a 64 KiB cluster per direct
/// write: a larger request can reach the daemon split at page boundaries
/// (seen with 1 MiB writes: the loop device's segment limits), and a
/// cluster written in two pieces is stored as a normal one.
fn dd_direct(source: &Path, device: &Path, offset: usize) {
    sh(
        "dd",
        &[
            &format!("if={}", source.display()),
            &format!("of={}", device.display()),
            "bs=64K",
            &format!("seek={}", offset / 65536),
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
    );
}

/// `attach --transport loop --qcow2-compress`: dd's compressible data is
/// stored compressed (`qemu-img map` says so, and the file holds a
/// fraction of it), random data as normal clusters; `qemu-img check`
/// clean and `qemu-img compare` equal after detach, and again after a
/// second attach overwrote parts of compressed clusters, discarded some
/// and rewrote others whole.
#[test]
fn compressed_writes_on_the_stock_path() {
    let instance = Instance::new("qcow2-compress");
    let dir = TempDir::new("qcow2-compress");
    let image = dir.join("compressed.qcow2");
    let size = 64 * MIB;
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            &size.to_string(),
        ],
    );
    let created = fs::metadata(&image).unwrap().len();
    let backend = format!("qcow2:{}", image.display());
    let mut model = vec![0u8; size];
    let compressible = text(16 * MIB);
    let source = dir.join("text");
    fs::write(&source, &compressible).unwrap();
    model[..16 * MIB].copy_from_slice(&compressible);
    let random = random_bytes(41, 16 * MIB);
    model[16 * MIB..32 * MIB].copy_from_slice(&random);

    let device = instance.attach(&["--transport", "loop", "--qcow2-compress", &backend]);
    dd_direct(&source, &device.path, 0);
    write_at(&device.path, 16 * MIB as u64, &random).unwrap();
    assert!(read_at(&device.path, 0, 32 * MIB) == model[..32 * MIB]);
    device.detach();
    assert_clean(&image);
    assert_same(&image, &model);
    let map = qemu_map(&image);
    assert_eq!(
        compressed_in(&map, 0, 16 * MIB as u64),
        Some(true),
        "{map:?}"
    );
    assert_eq!(
        compressed_in(&map, 16 * MIB as u64, 16 * MIB as u64),
        Some(false),
        "{map:?}"
    );
    let len = fs::metadata(&image).unwrap().len();
    eprintln!(
        "32 MiB written (16 compressible): image {} KiB, {} KiB created",
        len >> 10,
        created >> 10
    );
    assert!(
        len < created + (16 + 4) * MIB as u64,
        "{len} bytes for 16 MiB of random and 16 MiB of text"
    );

    // Into compressed clusters: a partial write, a discard, whole rewrites.
    let device = instance.attach(&[
        "--transport",
        "loop",
        "--block-size",
        "4096",
        "--qcow2-compress",
        &backend,
    ]);
    let patch = random_bytes(42, 4096);
    write_at(&device.path, 65536 + 4096, &patch).unwrap();
    model[65536 + 4096..65536 + 8192].copy_from_slice(&patch);
    sh(
        "blkdiscard",
        &[
            "--offset",
            "1048576",
            "--length",
            "1048576",
            device.path_str(),
        ],
    );
    model[MIB..2 * MIB].fill(0);
    let rewrite = text(2 * MIB + 100);
    fs::write(&source, &rewrite[100..]).unwrap();
    dd_direct(&source, &device.path, 4 * MIB);
    model[4 * MIB..6 * MIB].copy_from_slice(&rewrite[100..]);
    assert!(read_at(&device.path, 0, 32 * MIB) == model[..32 * MIB]);
    device.detach();
    assert_clean(&image);
    assert_same(&image, &model);
    let map = qemu_map(&image);
    assert_eq!(compressed_in(&map, 65536, 65536), Some(false), "{map:?}");
    assert_eq!(
        compressed_in(&map, 4 * MIB as u64, 2 * MIB as u64),
        Some(true),
        "{map:?}"
    );
    instance.assert_nothing_left();
}

/// `--qcow2-compress` with another backend: a one-line error, nothing
/// attached.
#[test]
fn qcow2_compress_is_refused_for_other_backends() {
    let instance = Instance::new("qcow2-compress-bad");
    for backend in ["mem:1M", "null:1M"] {
        let out = instance.run(["attach", "--qcow2-compress", backend]);
        assert!(!out.status.success(), "{backend} attached");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            format!("fuse-blk: {backend}: --qcow2-compress is for qcow2: images only"),
        );
        instance.assert_nothing_left();
    }
}
