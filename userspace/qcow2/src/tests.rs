//! Tests against qemu's own tools: images made by `qemu-img create` (and
//! `convert -c`, `snapshot -c`, `qemu-io`), written through the device,
//! then checked by `qemu-img check` (no corruption, no leaks), `qemu-img
//! compare` against a raw image holding what the test wrote, and `qemu-io`.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use crate::compressed::CompressedExtent;
use crate::image::Cluster;
use crate::testutil::{compressed_in, parse_map, MapExtent};
use crate::{Image, Options, Qcow2Device};
use fuse_blk_backends::testutil::{pattern, Harness};

const MIB: u64 = 1 << 20;

/// Runs a qemu tool. A refusal for a lock is retried for a while: the
/// tests run in threads of one process, and a child another thread is
/// forking shares every open file of the process, with its locks, until it
/// execs, so an image a test has just closed can look locked for a moment.
fn run(program: &str, args: &[&str]) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("{program}: {e} (the qcow2 tests need qemu-img and qemu-io: apt-get install qemu-utils)")
            });
        let locked = String::from_utf8_lossy(&out.stderr).contains("Failed to get");
        if out.status.success() || !locked || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Runs a qemu tool that must succeed; returns its standard output.
fn qemu(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn create(path: &Path, options: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path.to_str().unwrap(), &size]);
    qemu("qemu-img", &args);
}

fn create_overlay(path: &Path, backing: &Path, format: &str) {
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing.to_str().unwrap(),
            "-F",
            format,
            path.to_str().unwrap(),
        ],
    );
}

/// `qemu-img check`: clean means exit 0 (2 is corruption, 3 leaks).
fn assert_clean(path: &Path) {
    let out = run("qemu-img", &["check", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {} (exit {:?}): {}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of the image against a raw file holding `model`.
fn assert_same(path: &Path, model: &[u8]) {
    let raw = path.with_extension("model.raw");
    fs::write(&raw, model).unwrap();
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_file(raw).unwrap();
}

fn sha256(path: &Path) -> String {
    let out = run("sha256sum", &[path.to_str().unwrap()]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn open_with(path: &Path, read_only: bool, options: &Options) -> io::Result<Harness> {
    let device = Qcow2Device::open(path, read_only, 512, options)?;
    Ok(Harness::new(Arc::new(device)))
}

fn open(path: &Path) -> Harness {
    open_with(path, false, &Options::default()).unwrap()
}

fn open_err(path: &Path, read_only: bool) -> String {
    match Qcow2Device::open(path, read_only, 512, &Options::default()) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Bytes that do not compress (xorshift), unlike [`pattern`]'s.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A device and the bytes it should hold.
struct Checked {
    device: Harness,
    model: Vec<u8>,
}

impl Checked {
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.device.write(offset, data, false).unwrap();
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn zero(&mut self, offset: u64, len: u64, punch: bool) {
        if punch {
            self.device.write_zeroes(offset, len, true).unwrap();
        } else {
            self.device.write_zeroes(offset, len, false).unwrap();
        }
        self.model[offset as usize..(offset + len) as usize].fill(0);
    }

    fn verify(&self) {
        let size = self.model.len();
        let step = 256 << 10;
        for start in (0..size).step_by(step) {
            let len = step.min(size - start);
            let got = self.device.read(start as u64, len as u32).unwrap();
            assert!(
                got == self.model[start..start + len],
                "data differs in the 256 KiB at {start:#x}"
            );
        }
    }
}

/// Writes across cluster boundaries, overwrites, zeroes and punches
/// (stock-path discard), reading everything back.
fn exercise(checked: &mut Checked, cluster: u64) {
    let size = checked.model.len() as u64;
    checked.write(0, &pattern(1, 4096));
    checked.write(cluster - 512, &pattern(2, 8192));
    checked.write(3 * cluster + 1024, &pattern(3, (2 * cluster) as usize));
    checked.write(size - 4096, &pattern(4, 4096));
    checked.write(512, &pattern(5, 1024));
    checked.verify();
    checked.zero(cluster, cluster, false);
    checked.zero(3 * cluster + 512, cluster, true);
    checked.zero(size - 8192, 8192, true);
    checked.write(cluster + 512, &pattern(6, 512));
    checked.verify();
    checked.device.flush().unwrap();
}

fn scenario(dir: &Path, name: &str, options: &str, cluster: u64) {
    let path = dir.join(name);
    let size = (8 * cluster).max(4 * MIB);
    create(&path, options, size);
    let mut checked = Checked {
        device: open(&path),
        model: vec![0; size as usize],
    };
    exercise(&mut checked, cluster);
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
    // And again after reopening: what was flushed is what is there.
    let checked = Checked {
        device: open(&path),
        model,
    };
    checked.verify();
    drop(checked.device);
    assert_clean(&path);
}

#[test]
fn version_3_at_cluster_sizes() {
    let dir = tempfile::tempdir().unwrap();
    for bits in [12, 16, 21] {
        let cluster = 1u64 << bits;
        scenario(
            dir.path(),
            &format!("v3-{bits}.qcow2"),
            &format!("cluster_size={cluster}"),
            cluster,
        );
    }
}

#[test]
fn version_2() {
    let dir = tempfile::tempdir().unwrap();
    scenario(dir.path(), "v2.qcow2", "compat=0.10", 65536);
    scenario(
        dir.path(),
        "v2-4k.qcow2",
        "compat=0.10,cluster_size=4096",
        4096,
    );
}

/// A size that ends inside a cluster: the last cluster is written,
/// zeroed and discarded up to the end of the image.
#[test]
fn size_not_a_multiple_of_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    for (name, options) in [("v3", ""), ("v2", "compat=0.10")] {
        let base = dir.path().join(format!("{name}-base.raw"));
        let size = MIB + 12288;
        fs::write(&base, pattern(8, size as usize)).unwrap();
        for backing in [false, true] {
            let path = dir.path().join(format!("{name}-{backing}.qcow2"));
            let p = path.to_str().unwrap();
            let size_arg = size.to_string();
            let mut args = vec!["create", "-q", "-f", "qcow2"];
            if !options.is_empty() {
                args.extend(["-o", options]);
            }
            if backing {
                args.extend(["-b", base.to_str().unwrap(), "-F", "raw"]);
            }
            args.extend([p, &size_arg]);
            qemu("qemu-img", &args);
            let mut checked = Checked {
                device: open(&path),
                model: if backing {
                    pattern(8, size as usize)
                } else {
                    vec![0; size as usize]
                },
            };
            checked.write(size - 8192, &pattern(1, 4096));
            checked.verify();
            checked.zero(MIB, 12288, true);
            checked.verify();
            checked.write(MIB + 4096, &pattern(2, 8192));
            checked.zero(MIB, 12288, false);
            checked.verify();
            let Checked { device, model } = checked;
            drop(device);
            assert_clean(&path);
            assert_same(&path, &model);
        }
    }
}

#[test]
fn refcount_widths() {
    let dir = tempfile::tempdir().unwrap();
    for bits in [1, 2, 4, 8, 32, 64] {
        scenario(
            dir.path(),
            &format!("rc{bits}.qcow2"),
            &format!("refcount_bits={bits},cluster_size=4096"),
            4096,
        );
    }
}

#[test]
fn lazy_refcounts_image() {
    let dir = tempfile::tempdir().unwrap();
    scenario(dir.path(), "lazy.qcow2", "lazy_refcounts=on", 65536);
}

/// Write-zeroes without unmap keeps an owned cluster's storage (a zero
/// cluster with its host offset), which the next write to it reuses: the
/// file does not grow; with unmap the storage goes.
#[test]
fn zeroing_keeps_or_releases_storage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.qcow2");
    create(&path, "", 4 * MIB);
    let mut checked = Checked {
        device: open(&path),
        model: vec![0; 4 * MIB as usize],
    };
    checked.write(0, &pattern(1, 4 * 65536));
    checked.device.flush().unwrap();
    let len = fs::metadata(&path).unwrap().len();
    checked.zero(0, 2 * 65536, false);
    checked.write(4096, &pattern(2, 4096));
    checked.device.flush().unwrap();
    checked.verify();
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        len,
        "zeroed storage not reused"
    );
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
    let map = qemu(
        "qemu-img",
        &["map", "--output=json", path.to_str().unwrap()],
    );
    // The second cluster reads as zeros and still has its storage.
    assert!(
        map.lines().any(|l| l.contains("\"start\": 65536")
            && l.contains("\"zero\": true")
            && l.contains("\"offset\"")),
        "{map}"
    );
}

/// A persistent dirty bitmap is not kept up to date here, so a writable
/// open clears the autoclear bit, as the format asks of a program without
/// bitmap support: qemu then calls the bitmaps inconsistent and counts
/// their clusters as leaks (no corruption). A refused open leaves the bit.
#[test]
fn persistent_bitmaps_are_marked_stale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bitmap.qcow2");
    let p = path.to_str().unwrap();
    create(&path, "", 4 * MIB);
    qemu("qemu-img", &["bitmap", "--add", p, "b0"]);
    let autoclear = |path: &Path| fs::read(path).unwrap()[95];
    assert_eq!(autoclear(&path), 1);
    let reader = open_with(&path, true, &Options::default()).unwrap();
    drop(reader);
    assert_eq!(autoclear(&path), 1, "a read-only open cleared the bit");

    let mut checked = Checked {
        device: open(&path),
        model: vec![0; 4 * MIB as usize],
    };
    assert_eq!(autoclear(&path), 0);
    checked.write(65536, &pattern(1, 8192));
    let Checked { device, model } = checked;
    drop(device);
    assert_no_corruption(&path);
    assert_same(&path, &model);
    let _ = run("qemu-img", &["check", "-q", "-r", "leaks", p]);
    assert_clean(&path);

    // An overlay with a bitmap whose base is gone: refused, bit kept.
    let base = dir.path().join("base.raw");
    fs::write(&base, vec![0u8; MIB as usize]).unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    create_overlay(&overlay, &base, "raw");
    qemu(
        "qemu-img",
        &["bitmap", "--add", overlay.to_str().unwrap(), "b0"],
    );
    fs::remove_file(&base).unwrap();
    assert!(open_err(&overlay, false).contains("No such file or directory"));
    assert_eq!(autoclear(&overlay), 1, "a refused open cleared the bit");
}

/// Dirty images (qemu-io killed while writing with lazy refcounts, so the
/// refcounts on disk are stale): a read-only open leaves them as they are;
/// a writable one rebuilds the refcounts, clears the dirty bit, and the
/// image is clean after writing, with compressed clusters and a snapshot's
/// references counted right.
#[test]
fn dirty_images_get_their_refcounts_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let dirty_bit = |path: &Path| fs::read(path).unwrap()[79] & 1;
    let kill_while_writing = |path: &Path, pattern: &str| {
        let out = run(
            "qemu-io",
            &["-c", pattern, "-c", "sigraise 9", path.to_str().unwrap()],
        );
        assert!(!out.status.success(), "qemu-io was not killed");
        assert_eq!(dirty_bit(path), 1, "qemu-io left the image clean");
        let check = run("qemu-img", &["check", path.to_str().unwrap()]);
        assert_eq!(
            check.status.code(),
            Some(2),
            "the stale refcounts do not show"
        );
    };

    // Plain.
    let plain = dir.path().join("plain.qcow2");
    create(&plain, "lazy_refcounts=on,cluster_size=4096", 8 * MIB);
    kill_while_writing(&plain, "write -P 0x5a 0 1M");
    let before = fs::read(&plain).unwrap();
    let reader = open_with(&plain, true, &Options::default()).unwrap();
    assert_eq!(reader.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    drop(reader);
    assert!(
        fs::read(&plain).unwrap() == before,
        "a read-only open wrote"
    );
    let mut model = vec![0u8; 8 * MIB as usize];
    model[..MIB as usize].fill(0x5a);
    let mut checked = Checked {
        device: open(&plain),
        model,
    };
    assert_eq!(dirty_bit(&plain), 0);
    checked.write(2 * MIB, &pattern(1, 65536));
    checked.write(4096, &pattern(2, 4096));
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&plain);
    assert_same(&plain, &model);

    // Compressed clusters and an internal snapshot.
    let raw = dir.path().join("rich.raw");
    let data: Vec<u8> = (0..4 * MIB as usize).map(|i| (i / 3000) as u8).collect();
    fs::write(&raw, &data).unwrap();
    let rich = dir.path().join("rich.qcow2");
    let r = rich.to_str().unwrap();
    qemu(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            raw.to_str().unwrap(),
            r,
        ],
    );
    qemu("qemu-img", &["snapshot", "-c", "s", r]);
    kill_while_writing(&rich, "write -P 0x66 512k 256k");
    let mut model = data.clone();
    model[512 << 10..768 << 10].fill(0x66);
    let mut checked = Checked {
        device: open(&rich),
        model,
    };
    checked.write(MIB, &pattern(3, 8192));
    checked.write(3 * MIB + 512, &pattern(4, 4096));
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&rich);
    assert_same(&rich, &model);
    let snap = dir.path().join("snap.raw");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=s",
            "-O",
            "raw",
            r,
            snap.to_str().unwrap(),
        ],
    );
    assert!(fs::read(&snap).unwrap() == data, "the snapshot changed");
}

/// 512-byte clusters: the refcount table qemu creates covers 8 MiB of file
/// (64 blocks of 256 refcounts), so writing 24 MiB moves it (twice).
#[test]
fn refcount_table_grows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let size = 32 * MIB;
    create(&path, "cluster_size=512", size);
    let table_offset = |path: &Path| {
        let header = fs::read(path).unwrap();
        u64::from_be_bytes(header[48..56].try_into().unwrap())
    };
    let before = table_offset(&path);
    let mut checked = Checked {
        device: open(&path),
        model: vec![0; size as usize],
    };
    for i in 0..24u64 {
        checked.write(i * MIB + 4096, &pattern(i, MIB as usize - 8192));
        if i % 8 == 7 {
            checked.device.flush().unwrap();
        }
    }
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_ne!(table_offset(&path), before, "the table did not move");
    assert_clean(&path);
    assert_same(&path, &model);
    // Reopened, the moved table is the one read.
    let mut checked = Checked {
        device: open(&path),
        model,
    };
    checked.write(30 * MIB, &pattern(99, 4096));
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
}

/// Small caches: tables are evicted and written back early.
#[test]
fn tiny_caches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.qcow2");
    let size = 64 * MIB;
    create(&path, "cluster_size=4096", size);
    let options = Options {
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        ..Options::default()
    };
    let mut checked = Checked {
        device: open_with(&path, false, &options).unwrap(),
        model: vec![0; size as usize],
    };
    // Each 2 MiB of guest space has its own L2 table with 4 KiB clusters.
    for (i, offset) in (0..size).step_by((3 * MIB) as usize).enumerate() {
        checked.write(offset, &pattern(i as u64, 6144));
    }
    checked.verify();
    for offset in (0..size).step_by((6 * MIB) as usize) {
        checked.zero(offset, 8192, true);
    }
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
}

/// Data qemu wrote reads back here, and data written here reads back in
/// qemu-io.
#[test]
fn qemu_io_interoperates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("io.qcow2");
    create(&path, "", 8 * MIB);
    let p = path.to_str().unwrap();
    qemu("qemu-io", &["-c", "write -P 0x5a 65536 131072", p]);
    let device = open(&path);
    assert_eq!(device.read(65536, 131072).unwrap(), vec![0x5a; 131072]);
    assert_eq!(device.read(0, 65536).unwrap(), vec![0; 65536]);
    device.write(100 * 4096, &[0xc3; 12288], false).unwrap();
    device.write(65536 + 4096, &[0x11; 4096], true).unwrap();
    drop(device);
    assert_clean(&path);
    qemu("qemu-io", &["-c", "read -P 0xc3 409600 12288", p]);
    qemu("qemu-io", &["-c", "read -P 0x11 69632 4096", p]);
    qemu("qemu-io", &["-c", "read -P 0x5a 73728 122880", p]);
    let out = run("qemu-io", &["-c", "read -P 0x5a 69632 4096", p]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
        "qemu-io's pattern check is what the test relies on"
    );
}

#[test]
fn raw_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let size = 4 * MIB;
    let base_data = pattern(77, size as usize);
    fs::write(&base, &base_data).unwrap();
    let base_sum = sha256(&base);
    let overlay = dir.path().join("overlay.qcow2");
    create_overlay(&overlay, &base, "raw");

    let mut checked = Checked {
        device: open(&overlay),
        model: base_data,
    };
    checked.verify();
    exercise(&mut checked, 65536);
    // Discard (module path) of whole clusters reads zeros in version 3.
    checked.device.discard(5 * 65536, 2 * 65536).unwrap();
    checked.model[5 * 65536..7 * 65536].fill(0);
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&overlay);
    assert_same(&overlay, &model);
    assert_eq!(sha256(&base), base_sum, "the base was written");
}

#[test]
fn qcow2_backing_chain_and_smaller_base() {
    let dir = tempfile::tempdir().unwrap();
    // base.raw (1 MiB) <- mid.qcow2 (2 MiB, some data by qemu-io) <- top.
    let base = dir.path().join("base.raw");
    fs::write(&base, pattern(5, MIB as usize)).unwrap();
    let mid = dir.path().join("mid.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
            "2M",
        ],
    );
    qemu(
        "qemu-io",
        &["-c", "write -P 0x77 1536k 64k", mid.to_str().unwrap()],
    );
    let sums = (sha256(&base), sha256(&mid));
    let top = dir.path().join("top.qcow2");
    create_overlay(&top, &mid, "qcow2");

    let mut model = pattern(5, MIB as usize);
    model.resize(2 * MIB as usize, 0);
    model[1536 << 10..1600 << 10].fill(0x77);
    let mut checked = Checked {
        device: open(&top),
        model,
    };
    checked.verify();
    checked.write(1000 << 10, &pattern(9, 100 << 10));
    checked.write((1536 << 10) + 4096, &pattern(10, 4096));
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&top);
    assert_same(&top, &model);
    assert_eq!(
        (sha256(&base), sha256(&mid)),
        sums,
        "a backing file was written"
    );
}

fn compressed_image(dir: &Path, name: &str, options: &str) -> (PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.raw"));
    let mut data: Vec<u8> = (0..4 * MIB as usize).map(|i| (i / 1000) as u8).collect();
    // An all-zero stretch, which qemu leaves unallocated.
    data[MIB as usize..2 * MIB as usize].fill(0);
    fs::write(&raw, &data).unwrap();
    let path = dir.join(format!("{name}.qcow2"));
    let mut args = vec!["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([raw.to_str().unwrap(), path.to_str().unwrap()]);
    qemu("qemu-img", &args);
    (path, data)
}

#[test]
fn compressed_clusters() {
    let dir = tempfile::tempdir().unwrap();
    for (name, options) in [
        ("deflate", ""),
        ("zstd", "compression_type=zstd"),
        ("deflate-4k", "cluster_size=4096"),
    ] {
        let (path, model) = compressed_image(dir.path(), name, options);
        let mut checked = Checked {
            device: open(&path),
            model,
        };
        checked.verify();
        // Into compressed clusters: partial, whole, across two.
        checked.write(10240, &pattern(1, 3072));
        checked.write(3 * MIB, &pattern(2, 65536));
        checked.write(2 * MIB + 59904, &pattern(3, 10240));
        checked.zero(2 * MIB + 131072, 131072, true);
        checked.verify();
        let Checked { device, model } = checked;
        drop(device);
        assert_clean(&path);
        assert_same(&path, &model);
    }
}

/// `qemu-img map --output=json`: (start, length, compressed) of each
/// extent it lists.
fn qemu_map(path: &Path) -> Vec<MapExtent> {
    parse_map(&qemu(
        "qemu-img",
        &["map", "--output=json", path.to_str().unwrap()],
    ))
}

/// A device with compressed writes, and a model of zeros.
fn compressing(path: &Path) -> Checked {
    let options = Options {
        compress_writes: true,
        ..Options::default()
    };
    let device = open_with(path, false, &options).unwrap();
    let size = device.geometry().size as usize;
    Checked {
        device,
        model: vec![0; size],
    }
}

/// Compressed writes read back by qemu: images of each cluster size,
/// compression type and version written through the device with
/// compressible data (stored compressed: `qemu-img map` says so, and the
/// file is a fraction of it) and data that does not compress (stored as
/// normal clusters); `qemu-img check` clean and `qemu-img compare` equal
/// after it, and again after partial overwrites, discards, zeroing and
/// whole rewrites of compressed clusters.
#[test]
fn compressed_writes_qemu_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    for (name, options, cluster) in [
        ("64k", "", 65536u64),
        ("4k", "cluster_size=4096", 4096),
        ("2m", "cluster_size=2M", 2 * MIB),
        ("zstd", "compression_type=zstd", 65536),
        ("zstd-4k", "compression_type=zstd,cluster_size=4096", 4096),
        ("v2", "compat=0.10", 65536),
        ("v2-4k", "compat=0.10,cluster_size=4096", 4096),
    ] {
        let path = dir.path().join(format!("{name}.qcow2"));
        // 48 clusters at least: a quarter compressible, a quarter not, the
        // rest left alone.
        let size = (48 * cluster).max(8 * MIB);
        let quarter = size / 4;
        create(&path, options, size);
        let created = fs::metadata(&path).unwrap().len();
        let mut checked = compressing(&path);
        // One large write across many clusters, then one cluster at a
        // time, then the incompressible quarter.
        checked.write(0, &pattern(1, (quarter / 2) as usize));
        for at in (quarter / 2..quarter).step_by(cluster as usize) {
            checked.write(at, &pattern(at, cluster as usize));
        }
        checked.write(quarter, &noise(2, quarter as usize));
        checked.verify();
        let Checked { device, model } = checked;
        drop(device);
        assert_clean(&path);
        assert_same(&path, &model);
        let map = qemu_map(&path);
        assert_eq!(
            compressed_in(&map, 0, quarter),
            Some(true),
            "{name}: {map:?}"
        );
        assert_eq!(
            compressed_in(&map, quarter, quarter),
            Some(false),
            "{name}: {map:?}"
        );
        let len = fs::metadata(&path).unwrap().len();
        // Metadata: what qemu-img created, and an L2 table or two.
        let metadata = created + 2 * cluster;
        eprintln!(
            "{name}: {} KiB written ({} KiB compressible), image {} KiB, {} KiB created empty",
            (2 * quarter) >> 10,
            quarter >> 10,
            len >> 10,
            created >> 10
        );
        assert!(
            len < metadata + quarter + quarter / 4,
            "{name}: {len} bytes for {quarter} incompressible and {quarter} compressible"
        );

        // Into compressed clusters: partial overwrites (normal clusters
        // after), discards, zeroing, whole rewrites compressible or not.
        let mut checked = compressing(&path);
        checked.model = model;
        checked.write(cluster + 512, &noise(3, 1024));
        checked.device.discard(2 * cluster, 2 * cluster).unwrap();
        checked.model[2 * cluster as usize..4 * cluster as usize].fill(0);
        checked.zero(4 * cluster, cluster, true);
        checked.zero(5 * cluster, cluster, false);
        checked.write(6 * cluster, &pattern(7, 2 * cluster as usize));
        checked.write(8 * cluster, &noise(8, cluster as usize));
        // A whole cluster straddling two: two partial writes.
        checked.write(9 * cluster + cluster / 2, &pattern(9, cluster as usize));
        // Compressible data over incompressible normal clusters: written in
        // place, as before.
        checked.write(quarter, &pattern(10, cluster as usize));
        checked.verify();
        let Checked { device, model } = checked;
        drop(device);
        assert_clean(&path);
        assert_same(&path, &model);
        let map = qemu_map(&path);
        for (what, start, clusters, compressed) in [
            ("partly overwritten", cluster, 1, false),
            ("rewritten compressible", 6 * cluster, 2, true),
            ("rewritten incompressible", 8 * cluster, 1, false),
            ("straddled", 9 * cluster, 2, false),
            ("untouched", 11 * cluster, 1, true),
            ("normal, rewritten in place", quarter, 1, false),
        ] {
            assert_eq!(
                compressed_in(&map, start, clusters * cluster),
                Some(compressed),
                "{name}: {what} at {start:#x}: {map:?}"
            );
        }
    }
}

/// The end of an image whose size is not a multiple of the cluster: a
/// write reaching it covers the last cluster, which is stored compressed
/// (as qemu does, its tail past the end compressed as zeros).
#[test]
fn compressed_write_of_a_short_last_cluster() {
    let dir = tempfile::tempdir().unwrap();
    for options in ["", "compression_type=zstd", "compat=0.10"] {
        let path = dir.path().join("short.qcow2");
        let _ = fs::remove_file(&path);
        let size = MIB + 12288;
        create(&path, options, size);
        let mut checked = compressing(&path);
        checked.write(MIB, &pattern(4, 12288));
        // Not reaching the end: stored as a normal cluster.
        checked.write(MIB - 65536, &pattern(5, 32768));
        checked.verify();
        let Checked { device, model } = checked;
        drop(device);
        assert_clean(&path);
        assert_same(&path, &model);
        let map = qemu_map(&path);
        assert_eq!(
            compressed_in(&map, MIB, 12288),
            Some(true),
            "{options}: {map:?}"
        );
        assert_eq!(
            compressed_in(&map, MIB - 65536, 32768),
            Some(false),
            "{options}: {map:?}"
        );
    }
}

/// The host clusters compressed clusters share: packed several to a host
/// cluster, one spilling into the next, each host cluster's refcount the
/// number of compressed clusters touching it, and zero once all of them
/// were rewritten, discarded or zeroed.
#[test]
fn compressed_clusters_share_host_clusters_and_free_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pack.qcow2");
    create(&path, "", 4 * MIB);
    let cluster = 65536usize;
    // About 24000 bytes each once compressed: noise, then zeros.
    let clusters = 6;
    let mut checked = compressing(&path);
    for i in 0..clusters {
        let mut data = noise(100 + i as u64, 24000);
        data.resize(cluster, 0);
        checked.write((i * cluster) as u64, &data);
    }
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);

    let image = Image::open(&path, true, &Options::default()).unwrap();
    let extents: Vec<CompressedExtent> = (0..clusters as u64)
        .map(|c| {
            let entry = image.l2_entry(c).unwrap();
            match image.classify(c, entry).unwrap() {
                Cluster::Compressed(extent) => extent,
                other => panic!("guest cluster {c}: {other:?}"),
            }
        })
        .collect();
    let mut touching: std::collections::BTreeMap<u64, u64> = Default::default();
    for extent in &extents {
        for host in extent.host_clusters(16) {
            *touching.entry(host).or_default() += 1;
        }
    }
    assert!(
        touching.values().any(|&n| n >= 2),
        "no host cluster holds two compressed clusters: {extents:?}"
    );
    assert!(
        extents.iter().any(|e| e.host_clusters(16).count() == 2),
        "none spills into the next host cluster: {extents:?}"
    );
    assert!(
        extents
            .windows(2)
            .all(|w| w[1].offset >= w[0].offset + 24000),
        "overlapping: {extents:?}"
    );
    let refcount =
        |image: &Image, host: u64| image.refcounts.lock().get(&image.file, host).unwrap();
    for (&host, &count) in &touching {
        assert_eq!(refcount(&image, host), count, "host cluster {host:#x}");
    }
    drop(image);

    // Each of them replaced, one way or another.
    let mut checked = Checked {
        device: compressing(&path).device,
        model,
    };
    checked.write(512, &noise(1, 512));
    checked
        .device
        .discard(cluster as u64, cluster as u64)
        .unwrap();
    checked.model[cluster..2 * cluster].fill(0);
    checked.zero(2 * cluster as u64, cluster as u64, true);
    checked.write(3 * cluster as u64, &noise(3, cluster));
    checked.write(4 * cluster as u64, &pattern(4, 2 * cluster));
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
    let image = Image::open(&path, true, &Options::default()).unwrap();
    for &host in touching.keys() {
        assert_eq!(refcount(&image, host), 0, "host cluster {host:#x} kept");
    }
}

#[test]
fn internal_snapshot_is_left_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.qcow2");
    let p = path.to_str().unwrap();
    create(&path, "", 4 * MIB);
    qemu("qemu-io", &["-c", "write -P 0x61 0 2M", p]);
    qemu("qemu-img", &["snapshot", "-c", "before", p]);

    let mut model = vec![0u8; 4 * MIB as usize];
    model[..2 * MIB as usize].fill(0x61);
    let mut checked = Checked {
        device: open(&path),
        model,
    };
    checked.write(4096, &pattern(1, 4096));
    checked.write(MIB, &pattern(2, 65536));
    checked.write(3 * MIB, &pattern(3, 4096));
    checked.zero(1536 << 10, 128 << 10, true);
    checked.device.discard(256 << 10, 128 << 10).unwrap();
    checked.model[256 << 10..384 << 10].fill(0);
    checked.verify();
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
    assert!(qemu("qemu-img", &["snapshot", "-l", p]).contains("before"));
    // The snapshot still holds what it held.
    let snap = dir.path().join("snap.raw");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=before",
            "-O",
            "raw",
            p,
            snap.to_str().unwrap(),
        ],
    );
    let mut expected = vec![0u8; 4 * MIB as usize];
    expected[..2 * MIB as usize].fill(0x61);
    assert!(fs::read(&snap).unwrap() == expected, "the snapshot changed");
}

/// Several threads at once, on disjoint ranges some of which share
/// clusters and L2 tables.
#[test]
fn concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("par.qcow2");
    let size = 32 * MIB;
    create(&path, "cluster_size=4096", size);
    let device = Arc::new(Qcow2Device::open(&path, false, 512, &Options::default()).unwrap());
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let device = device.clone();
            scope.spawn(move || {
                let harness = Harness::new(device);
                for round in 0..50u64 {
                    // Thread t owns the 1 KiB slots t, t+4, ... of each 8 KiB.
                    let offset = (round * 37 % 4000) * 8192 + t * 1024;
                    let data = pattern(t * 1000 + round, 1024);
                    harness.write(offset, &data, false).unwrap();
                    assert_eq!(harness.read(offset, 1024).unwrap(), data);
                    if round % 10 == 9 {
                        harness.flush().unwrap();
                    }
                }
            });
        }
    });
    let mut model = vec![0u8; size as usize];
    for t in 0..4u64 {
        for round in 0..50u64 {
            let offset = ((round * 37 % 4000) * 8192 + t * 1024) as usize;
            model[offset..offset + 1024].copy_from_slice(&pattern(t * 1000 + round, 1024));
        }
    }
    let checked = Checked {
        device: Harness::new(device.clone()),
        model,
    };
    checked.verify();
    let Checked {
        device: harness,
        model,
    } = checked;
    drop(harness);
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
}

/// Compressed writes from several threads at once, sharing the cursor's
/// host clusters, L2 tables and tiny caches: each thread owns every fourth
/// 4 KiB cluster and writes it whole (compressible or not), partly, or
/// discards it, flushing now and then; the image is checked against the
/// combined model at the end.
#[test]
fn concurrent_compressed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("par-compressed.qcow2");
    let size = 16 * MIB;
    let cluster = 4096u64;
    create(&path, "cluster_size=4096", size);
    let options = Options {
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        compress_writes: true,
        ..Options::default()
    };
    let device = Arc::new(Qcow2Device::open(&path, false, 512, &options).unwrap());
    let clusters = size / cluster;
    let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let device = device.clone();
                scope.spawn(move || {
                    let harness = Harness::new(device);
                    let mut model = vec![0u8; size as usize];
                    for round in 0..300u64 {
                        let c = (round * 97 + t * 13) % (clusters / 4) * 4 + t;
                        let at = c * cluster;
                        let seed = t * 10_000 + round;
                        let range = at as usize..(at + cluster) as usize;
                        match round % 5 {
                            0 | 1 => {
                                let data = pattern(seed, cluster as usize);
                                harness.write(at, &data, false).unwrap();
                                model[range].copy_from_slice(&data);
                            }
                            2 => {
                                let data = noise(seed, cluster as usize);
                                harness.write(at, &data, false).unwrap();
                                model[range].copy_from_slice(&data);
                            }
                            3 => {
                                let data = noise(seed, 1024);
                                harness.write(at + 512, &data, false).unwrap();
                                model[range.start + 512..range.start + 1536].copy_from_slice(&data);
                            }
                            _ => {
                                harness.discard(at, cluster).unwrap();
                                model[range].fill(0);
                            }
                        }
                        if round % 25 == 24 {
                            harness.flush().unwrap();
                        }
                    }
                    model
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut model = vec![0u8; size as usize];
    for c in 0..clusters {
        let range = (c * cluster) as usize..((c + 1) * cluster) as usize;
        model[range.clone()].copy_from_slice(&models[(c % 4) as usize][range]);
    }
    let checked = Checked {
        device: Harness::new(device.clone()),
        model,
    };
    checked.verify();
    let Checked {
        device: harness,
        model,
    } = checked;
    drop(harness);
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
    let map = qemu_map(&path);
    assert!(map.iter().any(|&(_, _, compressed)| compressed), "{map:?}");
}

/// Threads own interleaved 2 KiB stripes of an overlay (over a raw base),
/// so that they share clusters and L2 tables, and write, zero, read and
/// flush at random in them, with caches small enough that tables are
/// evicted and written back while the others work; the image is checked
/// against the combined model at the end.
#[test]
fn concurrent_mixed_requests_with_tiny_caches() {
    const STRIPE: usize = 2048;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let size = 16 * MIB as usize;
    fs::write(&base, pattern(5, size)).unwrap();
    let path = dir.path().join("mixed.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            path.to_str().unwrap(),
        ],
    );
    let options = Options {
        l2_cache_bytes: 0,
        refcount_cache_bytes: 0,
        ..Options::default()
    };
    let device = Arc::new(Qcow2Device::open(&path, false, 512, &options).unwrap());
    let threads = 4;
    let model = Arc::new(parking_lot::Mutex::new(pattern(5, size)));
    std::thread::scope(|scope| {
        for t in 0..threads {
            let device = device.clone();
            let model = model.clone();
            scope.spawn(move || {
                let harness = Harness::new(device);
                let mut rng = t as u64 * 7919 + 1;
                let mut next = move |bound: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % bound
                };
                for round in 0..400u64 {
                    // A stripe of this thread's, and sectors inside it.
                    let stripe = next((size / STRIPE / threads) as u64) as usize * threads + t;
                    let first = next(4) as usize;
                    let sectors = 1 + next(4 - first as u64) as usize;
                    let at = stripe * STRIPE + first * 512;
                    let len = sectors * 512;
                    match next(6) {
                        0..=2 => {
                            let data = pattern(t as u64 * 100_000 + round, len);
                            harness.write(at as u64, &data, false).unwrap();
                            model.lock()[at..at + len].copy_from_slice(&data);
                        }
                        3 => {
                            harness.write_zeroes(at as u64, len as u64, true).unwrap();
                            model.lock()[at..at + len].fill(0);
                        }
                        4 => {
                            let got = harness.read(at as u64, len as u32).unwrap();
                            // Only this thread writes the stripe.
                            assert!(
                                got == model.lock()[at..at + len],
                                "thread {t} round {round}"
                            );
                        }
                        _ => harness.flush().unwrap(),
                    }
                }
            });
        }
    });
    let model = model.lock().clone();
    let checked = Checked {
        device: Harness::new(device.clone()),
        model,
    };
    checked.verify();
    let Checked {
        device: harness,
        model,
    } = checked;
    drop(harness);
    drop(device);
    assert_clean(&path);
    assert_same(&path, &model);
}

#[test]
fn read_only_opens_leave_the_image_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.qcow2");
    create(&path, "", 4 * MIB);
    qemu(
        "qemu-io",
        &["-c", "write -P 0x42 0 64k", path.to_str().unwrap()],
    );
    let sum = sha256(&path);
    let device = open_with(&path, true, &Options::default()).unwrap();
    assert_eq!(device.read(0, 65536).unwrap(), vec![0x42; 65536]);
    assert_eq!(device.write(0, &[1; 512], false), Err(libc::EROFS));
    drop(device);
    assert_eq!(sha256(&path), sum);
}

fn set_bytes(path: &Path, offset: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

#[test]
fn bad_images_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = d.join("good.qcow2");
    create(&good, "", 4 * MIB);
    let variant = |name: &str, offset: u64, bytes: &[u8]| {
        let path = d.join(name);
        fs::copy(&good, &path).unwrap();
        set_bytes(&path, offset, bytes);
        path
    };
    let expect = |path: &Path, read_only: bool, message: &str| {
        let error = open_err(path, read_only);
        assert_eq!(error, format!("{}: {message}", path.display()));
        assert!(!error.contains('\n'));
    };

    let text = d.join("text.img");
    fs::write(&text, vec![b'x'; 4096]).unwrap();
    expect(&text, false, "not a qcow2 image (no QFI\\xfb magic)");
    let truncated = d.join("truncated.qcow2");
    fs::write(&truncated, &fs::read(&good).unwrap()[..60]).unwrap();
    expect(
        &truncated,
        false,
        "truncated qcow2 header (60 bytes of file)",
    );
    expect(
        &variant("unknown.qcow2", 72, &(1u64 << 20).to_be_bytes()),
        false,
        "unknown incompatible qcow2 feature bits 0x100000",
    );
    expect(
        &variant("corrupt.qcow2", 72, &2u64.to_be_bytes()),
        true,
        "image is marked corrupt; repair it with `qemu-img check -r all` first",
    );
    let file_len = fs::metadata(&good).unwrap().len();
    expect(
        &variant("l1.qcow2", 40, &(1u64 << 40).to_be_bytes()),
        false,
        &format!("L1 table at 0x10000000000 lies outside the file ({file_len} bytes)"),
    );
    expect(
        &variant("crypt.qcow2", 32, &1u32.to_be_bytes()),
        false,
        "encrypted qcow2 images are not supported",
    );
    expect(
        &d.join("nonexistent.qcow2"),
        false,
        "No such file or directory",
    );

    // Backing file missing, and a loop.
    let base = d.join("base.qcow2");
    create(&base, "", 4 * MIB);
    let overlay = d.join("overlay.qcow2");
    create_overlay(&overlay, &base, "qcow2");
    fs::remove_file(&base).unwrap();
    expect(
        &overlay,
        false,
        &format!("backing file {}: No such file or directory", base.display()),
    );
    // Make base an overlay of overlay: qemu-img refuses, so rebase unsafely.
    create(&base, "", 4 * MIB);
    qemu(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            overlay.to_str().unwrap(),
            "-F",
            "qcow2",
            base.to_str().unwrap(),
        ],
    );
    let error = open_err(&overlay, false);
    assert_eq!(
        error,
        format!(
            "{}: backing chain loops back to {}",
            base.display(),
            fs::canonicalize(&overlay).unwrap().display()
        )
    );
}

#[test]
fn luks_encryption_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("luks.qcow2");
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            path.to_str().unwrap(),
            "4M",
        ],
    );
    assert_eq!(
        open_err(&path, false),
        format!(
            "{}: encrypted qcow2 images are not supported",
            path.display()
        )
    );
}

/// An L2 entry pointing past the end of the file fails the requests that
/// use it with EIO, and nothing is written outside the image.
#[test]
fn corrupt_l2_entry_gives_eio() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-l2.qcow2");
    create(&path, "", 4 * MIB);
    qemu(
        "qemu-io",
        &["-c", "write -P 0x33 0 128k", path.to_str().unwrap()],
    );
    // Find the L2 table through the L1 table and break its first entry.
    let image = fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(image[40..48].try_into().unwrap()) as usize;
    let l2 = u64::from_be_bytes(image[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    set_bytes(&path, l2, &((1u64 << 63) | (1 << 40)).to_be_bytes());
    let len = fs::metadata(&path).unwrap().len();

    let device = open(&path);
    assert_eq!(device.read(0, 4096), Err(libc::EIO));
    assert_eq!(device.read(0, 128 << 10), Err(libc::EIO));
    assert_eq!(device.write(512, &[1; 512], false), Err(libc::EIO));
    assert_eq!(device.write_zeroes(0, 65536, true), Err(libc::EIO));
    // The second cluster is fine.
    assert_eq!(device.read(65536, 4096).unwrap(), vec![0x33; 4096]);
    device.flush().unwrap();
    drop(device);
    assert_eq!(fs::metadata(&path).unwrap().len(), len);
}

/// A refcount block that says the L1 table's cluster is free: the
/// allocator's pick is refused with EIO instead of overwriting the table.
#[test]
fn zero_refcount_of_metadata_is_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-rc.qcow2");
    create(&path, "cluster_size=4096", 4 * MIB);
    let image = fs::read(&path).unwrap();
    let be64 = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
    let l1 = be64(40);
    let block = be64(be64(48) as usize);
    // 16-bit refcounts: the L1 table's entry in the first block.
    set_bytes(&path, block + (l1 / 4096) * 2, &[0, 0]);
    // Two entries: 4 MiB of 2 MiB per L2 table.
    let l1_before = fs::read(&path).unwrap()[l1 as usize..l1 as usize + 16].to_vec();
    let device = open(&path);
    assert_eq!(device.write(0, &[7; 4096], false), Err(libc::EIO));
    drop(device);
    let after = fs::read(&path).unwrap();
    assert!(
        after[l1 as usize..l1 as usize + 16] == l1_before[..],
        "the L1 table was overwritten"
    );
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.qcow2");
    create(&path, "", 4 * MIB);
    let first = open(&path);
    assert_eq!(
        open_err(&path, false),
        format!("{}: in use by another process (locked)", path.display())
    );
    assert_eq!(
        open_err(&path, true),
        format!("{}: in use by another process (locked)", path.display())
    );
    drop(first);
    // Two readers share an image.
    let reader = open_with(&path, true, &Options::default()).unwrap();
    drop(open_with(&path, true, &Options::default()).unwrap());
    drop(reader);
    drop(open(&path));
}

/// A successor (`attach --recover`, `handoff`) opens while the old daemon
/// still holds the image: its requests wait until the old one closes it,
/// then see everything the old one wrote, metadata it had only cached
/// included.
#[test]
fn a_successor_waits_for_the_lock_then_sees_what_the_old_one_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handed.qcow2");
    create(&path, "cluster_size=4096", 4 * MIB);
    let old = open(&path);
    old.write(0, &pattern(1, 65536), false).unwrap();
    let waiting = Options {
        wait_for_lock: Some(std::time::Duration::from_secs(60)),
        ..Options::default()
    };
    let new = open_with(&path, false, &waiting).unwrap();
    assert_eq!(new.geometry().size, 4 * MIB);
    let first_read = std::thread::scope(|scope| {
        let reader = scope.spawn(|| new.read(0, 65536));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !reader.is_finished(),
            "a request was served while the old device held the image"
        );
        old.write(65536, &pattern(2, 4096), false).unwrap();
        drop(old);
        reader.join().unwrap()
    });
    assert_eq!(first_read, Ok(pattern(1, 65536)));
    assert_eq!(new.read(65536, 4096), Ok(pattern(2, 4096)));
    new.write(2 * MIB, &pattern(3, 8192), false).unwrap();
    drop(new);
    assert_clean(&path);
    let mut model = vec![0u8; 4 * MIB as usize];
    model[..65536].copy_from_slice(&pattern(1, 65536));
    model[65536..69632].copy_from_slice(&pattern(2, 4096));
    model[2 * MIB as usize..2 * MIB as usize + 8192].copy_from_slice(&pattern(3, 8192));
    assert_same(&path, &model);
}

/// A lock that never comes free fails the successor's requests with EIO
/// once the wait is over, and the image stays the old device's.
#[test]
fn a_successor_whose_lock_never_comes_free_fails_its_requests() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kept.qcow2");
    create(&path, "cluster_size=4096", 4 * MIB);
    let old = open(&path);
    let waiting = Options {
        wait_for_lock: Some(std::time::Duration::from_millis(300)),
        ..Options::default()
    };
    let new = open_with(&path, false, &waiting).unwrap();
    assert_eq!(new.write(0, &pattern(1, 4096), false), Err(libc::EIO));
    assert_eq!(new.read(0, 4096), Err(libc::EIO));
    assert_eq!(new.flush(), Err(libc::EIO));
    old.write(0, &pattern(2, 4096), false).unwrap();
    drop(new);
    drop(old);
    assert_clean(&path);
    let mut model = vec![0u8; 4 * MIB as usize];
    model[..4096].copy_from_slice(&pattern(2, 4096));
    assert_same(&path, &model);
}

/// The locks are qemu's: qemu refuses an image attached here, or its base,
/// and an image qemu has open is refused here.
#[test]
fn locks_keep_qemu_out_and_in() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    fs::write(&base, vec![0u8; 4 * MIB as usize]).unwrap();
    let path = dir.path().join("overlay.qcow2");
    create_overlay(&path, &base, "raw");
    let p = path.to_str().unwrap();

    let device = open(&path);
    for args in [
        vec!["-c", "read 0 512", p],
        vec!["-r", "-c", "read 0 512", p],
        vec!["-f", "raw", "-c", "write 0 512", base.to_str().unwrap()],
    ] {
        let out = run("qemu-io", &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("lock"),
            "qemu-io {args:?} while attached: {stderr}"
        );
    }
    // Reading the base is fine, as for any other overlay over it.
    qemu(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read 0 512",
            base.to_str().unwrap(),
        ],
    );
    drop(device);

    let mut qemu_io = Command::new("qemu-io")
        .arg(p)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // qemu-io has the image open once its prompt or first answer is out.
    {
        use std::io::{BufRead, Write};
        let stdin = qemu_io.stdin.as_mut().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(qemu_io.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
    }
    assert_eq!(
        open_err(&path, false),
        format!("{}: in use by another process (locked)", path.display())
    );
    drop(qemu_io.stdin.take());
    assert!(qemu_io.wait().unwrap().success());
    drop(open(&path));
}

/// `qemu-img check` after a crash: leaks are allowed (exit 3), corruption
/// (exit 2) or anything else is not.
fn assert_no_corruption(path: &Path) {
    let out = run("qemu-img", &["check", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 3)) && !stdout.contains("ERROR"),
        "qemu-img check {} (exit {:?}): {stdout}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A daemon killed without a flush (the page cache keeps what it wrote)
/// leaves every answered write readable, metadata included, and leaks at
/// most: a module device recovered by another daemon goes on with the data
/// its file system was told was written. New L2 tables, copies of
/// snapshot clusters, discards, a refcount table grown by the writes.
#[test]
fn a_killed_daemon_leaves_every_answered_write() {
    a_killed_daemon(false);
    a_killed_daemon(true);
}

fn a_killed_daemon(compress_writes: bool) {
    let options = Options {
        compress_writes,
        ..Options::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("killed.qcow2");
    let p = path.to_str().unwrap();
    let size = 64 * MIB;
    create(&path, "cluster_size=4096", size);
    qemu("qemu-io", &["-c", "write -P 0x33 0 1M", p]);
    qemu("qemu-img", &["snapshot", "-c", "s", p]);
    let mut model = vec![0u8; size as usize];
    model[..MIB as usize].fill(0x33);
    let device = Arc::new(Qcow2Device::open(&path, false, 512, &options).unwrap());
    let mut checked = Checked {
        device: Harness::new(device.clone()),
        model,
    };
    checked.write(4096, &pattern(1, 8192));
    checked.device.flush().unwrap();
    for i in 0..200u64 {
        // Spread over every L2 table (2 MiB each), so that the refcount
        // table grows.
        checked.write(
            (i * 320 * 1024 + 512 * i) % (size - 65536),
            &pattern(i + 2, 6144),
        );
    }
    checked.zero(8 * MIB, 4 * MIB, true);
    checked.device.discard(0, 4096).unwrap();
    checked.model[..4096].fill(0);
    device.image().unwrap().crash_after(0);
    let model = checked.model.clone();
    drop(checked);
    drop(device);
    assert_no_corruption(&path);
    let reopened = Checked {
        device: open(&path),
        model,
    };
    reopened.verify();
}

/// A crash before a flush or after each of its steps leaves an image that
/// `qemu-img check` finds leaks in at most, with every sector holding what
/// the last completed flush covered or what came after it, the snapshot
/// intact, and everything once the L1 table is written.
#[test]
fn crash_at_each_flush_step_leaves_leaks_at_most() {
    crash_at_each_flush_step(false);
    crash_at_each_flush_step(true);
}

/// With compressed writes or not (the 4 KiB clusters of compressible data
/// written whole are stored compressed then).
fn crash_at_each_flush_step(compress_writes: bool) {
    let options = Options {
        compress_writes,
        ..Options::default()
    };
    for step in 0..=4 {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let size = 4 * MIB as usize;
        fs::write(&base, pattern(3, size)).unwrap();
        let path = dir.path().join("crash.qcow2");
        let p = path.to_str().unwrap();
        qemu(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-b",
                base.to_str().unwrap(),
                "-F",
                "raw",
                p,
            ],
        );
        qemu("qemu-io", &["-c", "write -P 0x71 1M 1M", p]);
        qemu("qemu-img", &["snapshot", "-c", "s", p]);
        let mut snapshot = pattern(3, size);
        snapshot[MIB as usize..2 * MIB as usize].fill(0x71);

        let device = Arc::new(Qcow2Device::open(&path, false, 512, &options).unwrap());
        let mut checked = Checked {
            device: Harness::new(device.clone()),
            model: snapshot.clone(),
        };
        checked.write(0, &pattern(10, 20480));
        checked.write(MIB + 4096, &pattern(11, 8192));
        checked.zero(3 * MIB, 65536, true);
        checked.device.flush().unwrap();
        let flushed = checked.model.clone();
        // After the flush: overwrites, copies of snapshot clusters, new L2
        // tables, frees; a sector may end up in any state it went through.
        let mut versions = vec![flushed.clone()];
        checked.write(2048, &pattern(12, 4096));
        versions.push(checked.model.clone());
        checked.write(MIB + 65536, &pattern(13, 12288));
        checked.write(2 * MIB + 4096 * 100, &pattern(14, 4096));
        checked.write(3 * MIB + 8192, &pattern(15, 4096));
        checked.zero(MIB + 4096, 4096, true);
        versions.push(checked.model.clone());
        checked.zero(0, 4096, true);
        let after = checked.model.clone();
        device.image().unwrap().crash_after(step);
        if step > 0 {
            assert!(checked.device.flush().is_err());
        }
        drop(checked);
        drop(device);

        assert_no_corruption(&path);
        let reopened = open(&path);
        let got = reopened.read(0, size as u32).unwrap();
        drop(reopened);
        if step >= 3 {
            assert!(got == after, "step {step}: flushed metadata lost");
        }
        for sector in 0..size / 512 {
            let range = sector * 512..(sector + 1) * 512;
            assert!(
                got[range.clone()] == after[range.clone()]
                    || versions
                        .iter()
                        .any(|v| got[range.clone()] == v[range.clone()]),
                "step {step}: sector {sector} holds neither the flushed nor any later data"
            );
        }
        let snap = dir.path().join("snap.raw");
        qemu(
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=s",
                "-O",
                "raw",
                p,
                snap.to_str().unwrap(),
            ],
        );
        assert!(
            fs::read(&snap).unwrap() == snapshot,
            "step {step}: the snapshot changed"
        );
        // Leaks repaired, the image is clean and usable again.
        let _ = run("qemu-img", &["check", "-q", "-r", "leaks", p]);
        assert_clean(&path);
    }
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            sector: u64,
            sectors: u64,
            seed: u64,
        },
        Discard {
            sector: u64,
            sectors: u64,
        },
        Zero {
            sector: u64,
            sectors: u64,
            punch: bool,
        },
        Read {
            sector: u64,
            sectors: u64,
        },
        Flush,
        Reopen,
    }

    /// 2 MiB of 4 KiB clusters: 512 L2 entries per table, 4096 sectors.
    const SECTORS: u64 = 4096;

    fn range() -> impl Strategy<Value = (u64, u64)> {
        (0..SECTORS).prop_flat_map(|start| (Just(start), 1..=(SECTORS - start).min(64)))
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (range(), any::<u64>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
            1 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
            1 => (range(), any::<bool>()).prop_map(|((sector, sectors), punch)| Op::Zero { sector, sectors, punch }),
            2 => range().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
            1 => Just(Op::Flush),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Random requests against a Vec, over a raw backing file, with
        /// reopens, with compressed writes or not; the image is clean and
        /// equal to the model at the end.
        #[test]
        fn matches_a_model(
            ops in proptest::collection::vec(op(), 1..60),
            backing in any::<bool>(),
            compress_writes in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.qcow2");
            let size = SECTORS * 512;
            let mut model = vec![0u8; size as usize];
            if backing {
                let base = dir.path().join("base.raw");
                model = pattern(42, size as usize);
                fs::write(&base, &model).unwrap();
                create_overlay(&path, &base, "raw");
            } else {
                create(&path, "cluster_size=4096", size);
            }
            let options = Options { l2_cache_bytes: 0, refcount_cache_bytes: 0, compress_writes, ..Options::default() };
            let mut device = open_with(&path, false, &options).unwrap();
            for op in ops {
                match op {
                    Op::Write { sector, sectors, seed } => {
                        // Compressible or not, for compressed writes.
                        let data = if seed % 2 == 0 {
                            pattern(seed, (sectors * 512) as usize)
                        } else {
                            noise(seed, (sectors * 512) as usize)
                        };
                        device.write(sector * 512, &data, false).unwrap();
                        model[(sector * 512) as usize..((sector + sectors) * 512) as usize].copy_from_slice(&data);
                    }
                    Op::Discard { sector, sectors } => {
                        // A discard may leave old data or zeros: learn
                        // which from the device, then check both allowed.
                        let (start, end) = ((sector * 512) as usize, ((sector + sectors) * 512) as usize);
                        device.discard(sector * 512, sectors * 512).unwrap();
                        let got = device.read(sector * 512, (sectors * 512) as u32).unwrap();
                        for (i, byte) in got.iter().enumerate() {
                            prop_assert!(*byte == 0 || *byte == model[start + i]);
                        }
                        model[start..end].copy_from_slice(&got);
                    }
                    Op::Zero { sector, sectors, punch } => {
                        if punch {
                            device.write_zeroes(sector * 512, sectors * 512, true).unwrap();
                        } else {
                            device.write_zeroes(sector * 512, sectors * 512, false).unwrap();
                        }
                        model[(sector * 512) as usize..((sector + sectors) * 512) as usize].fill(0);
                    }
                    Op::Read { sector, sectors } => {
                        let got = device.read(sector * 512, (sectors * 512) as u32).unwrap();
                        prop_assert!(got == model[(sector * 512) as usize..((sector + sectors) * 512) as usize]);
                    }
                    Op::Flush => device.flush().unwrap(),
                    Op::Reopen => {
                        drop(device);
                        device = open_with(&path, false, &options).unwrap();
                    }
                }
            }
            prop_assert!(device.read(0, size as u32).unwrap() == model);
            drop(device);
            assert_clean(&path);
            assert_same(&path, &model);
        }
    }

    /// Host offsets of every 8-byte metadata word of a qcow2 image: the L1
    /// table, the refcount table, refcount blocks and L2 tables.
    fn metadata_words(image: &[u8]) -> Vec<u64> {
        let be64 = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().unwrap());
        let be32 = |at: usize| u32::from_be_bytes(image[at..at + 4].try_into().unwrap());
        let cluster = 1u64 << be32(20);
        let mask = 0x00ff_ffff_ffff_fe00;
        let mut words = Vec::new();
        let l1 = be64(40);
        for i in 0..u64::from(be32(36)) {
            words.push(l1 + i * 8);
            let l2 = be64((l1 + i * 8) as usize) & mask;
            if l2 != 0 {
                words.extend((0..cluster / 8).map(|j| l2 + j * 8));
            }
        }
        let table = be64(48);
        for i in 0..u64::from(be32(56)) * cluster / 8 {
            words.push(table + i * 8);
            let block = be64((table + i * 8) as usize) & mask;
            if block != 0 {
                words.extend((0..cluster / 8).map(|j| block + j * 8));
            }
        }
        words
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Corrupted metadata words (random values, or single flipped bits)
        /// make requests fail with EIO or succeed, never panic, and nothing
        /// is written past what the image could have allocated.
        #[test]
        fn corrupt_metadata_never_panics(
            corruptions in proptest::collection::vec((any::<prop::sample::Index>(), any::<u64>(), any::<bool>()), 1..6),
            ops in proptest::collection::vec(op(), 1..30),
            dirty in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("corrupt.qcow2");
            let size = SECTORS * 512;
            create(&path, "cluster_size=4096", size);
            qemu("qemu-io", &["-c", "write -P 0x21 0 1M", "-c", "write -c -P 0x22 1M 64k", path.to_str().unwrap()]);
            let image = fs::read(&path).unwrap();
            // Words in use: corrupting those shows.
            let words: Vec<u64> = metadata_words(&image)
                .into_iter()
                .filter(|&at| image[at as usize..at as usize + 8] != [0; 8])
                .collect();
            let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
            for (index, value, flip) in corruptions {
                let at = words[index.index(words.len())];
                let old = u64::from_be_bytes(image[at as usize..at as usize + 8].try_into().unwrap());
                let new = if flip { old ^ (1 << (value % 64)) } else { value };
                file.write_all_at(&new.to_be_bytes(), at).unwrap();
            }
            if dirty {
                // The refcounts are then rebuilt from the corrupt tables.
                file.write_all_at(&[1], 79).unwrap();
            }
            drop(file);
            let header = fs::read(&path).unwrap()[..104].to_vec();
            let len = fs::metadata(&path).unwrap().len();
            let Ok(device) = open_with(&path, false, &Options::default()) else {
                return Ok(());
            };
            let mut written = 0u64;
            for op in ops {
                let result = match op {
                    Op::Write { sector, sectors, seed } => {
                        written += sectors * 512;
                        device.write(sector * 512, &pattern(seed, (sectors * 512) as usize), false)
                    }
                    Op::Discard { sector, sectors } => device.discard(sector * 512, sectors * 512),
                    Op::Zero { sector, sectors, punch: true } => device.write_zeroes(sector * 512, sectors * 512, true),
                    Op::Zero { sector, sectors, punch: false } => device.write_zeroes(sector * 512, sectors * 512, false),
                    Op::Read { sector, sectors } => device.read(sector * 512, (sectors * 512) as u32).map(drop),
                    Op::Flush | Op::Reopen => device.flush(),
                };
                if let Err(errno) = result {
                    prop_assert!(errno == libc::EIO, "errno {errno}");
                }
            }
            drop(device);
            let after = fs::read(&path).unwrap();
            // Only what a refcount rebuild changes: the refcount table's
            // place and size, and the dirty bit.
            let mut expected = header.clone();
            if dirty && after[79] & 1 == 0 {
                expected[48..60].copy_from_slice(&after[48..60]);
                expected[79] &= !1;
            }
            prop_assert!(after[..104] == expected[..], "the header changed");
            // Each written sector allocates at most one data cluster, one
            // L2 table and one refcount block (plus a grown refcount table).
            let bound = len + written * 3 * 4096 / 512 + 64 * 4096;
            prop_assert!((after.len() as u64) <= bound, "file grew to {} (from {len})", after.len());
        }
    }
}

/// The virtual size `qemu-img info` reports ("virtual size: 64 MiB
/// (67108864 bytes)").
fn qemu_virtual_size(path: &Path) -> u64 {
    let info = qemu("qemu-img", &["info", path.to_str().unwrap()]);
    let line = info
        .lines()
        .find(|line| line.starts_with("virtual size:"))
        .unwrap_or_else(|| panic!("no virtual size in {info}"));
    let bytes = line.rsplit_once('(').expect("(N bytes)").1;
    bytes.trim_end_matches(" bytes)").parse().unwrap()
}

#[test]
fn grows_online_within_its_l1_table_and_qemu_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    // 4 KiB clusters: one L1 entry covers 2 MiB and the L1 cluster holds
    // 512 of them (1 GiB); 3 MiB uses 2 entries.
    let path = dir.path().join("grow.qcow2");
    create(&path, "cluster_size=4096", 3 * MIB);
    let mut checked = Checked {
        device: open(&path),
        model: vec![0; 3 * MIB as usize],
    };
    checked.write(MIB, &pattern(1, 64 << 10));
    checked.device.resize(64 * MIB).unwrap();
    assert_eq!(checked.device.geometry().size, 64 * MIB);
    checked.model.resize(64 * MIB as usize, 0);
    // Across the old end and in L1 entries the image did not count before.
    checked.write(3 * MIB - 4096, &pattern(2, 8192));
    checked.write(60 * MIB, &pattern(3, 128 << 10));
    checked.verify();
    checked.device.flush().unwrap();
    // Shrinking and growing past the L1 table's room are refused, and
    // leave the size as it was.
    let e = checked.device.resize(32 * MIB).unwrap_err();
    assert!(e.to_string().contains("shrinking"), "{e}");
    let e = checked.device.resize(2048 * MIB).unwrap_err();
    assert!(e.to_string().contains("qemu-img resize"), "{e}");
    assert_eq!(checked.device.geometry().size, 64 * MIB);
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&path);
    assert_eq!(qemu_virtual_size(&path), 64 * MIB);
    assert_same(&path, &model);
    // Opened again, it has the new size and the data.
    let again = open(&path);
    assert_eq!(again.geometry().size, 64 * MIB);
    assert_eq!(
        again.read(60 * MIB, 4096).unwrap(),
        pattern(3, 128 << 10)[..4096]
    );
}

#[test]
fn an_overlay_grown_past_its_base_reads_zeros_there() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    fs::write(&base, pattern(4, 2 * MIB as usize)).unwrap();
    let base_sum = sha256(&base);
    let overlay = dir.path().join("overlay.qcow2");
    create_overlay(&overlay, &base, "raw");
    let mut model = pattern(4, 2 * MIB as usize);
    let device = open(&overlay);
    device.resize(8 * MIB).unwrap();
    model.resize(8 * MIB as usize, 0);
    let mut checked = Checked { device, model };
    checked.verify();
    checked.write(6 * MIB, &pattern(5, 4096));
    let Checked { device, model } = checked;
    drop(device);
    assert_clean(&overlay);
    assert_same(&overlay, &model);
    assert_eq!(sha256(&base), base_sum, "the base was written");
}
