//! The programs in userspace/attach/examples, run as a newcomer runs them:
//! each prints its device's path, serves I/O, and on SIGINT (Ctrl-C)
//! detaches and leaves nothing behind (no device, mount, directory or
//! process). They attach with `--transport auto` semantics: the stock path
//! on this host unless the module is loaded.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fuse_blk_tests::{assert_root, fio_verify, random_bytes, sh, write_at, TempDir};

const MIB: usize = 1 << 20;

/// Generous: the machine may be busy with other tests and VM guests.
const PATIENCE: Duration = Duration::from_secs(120);

/// An example binary, built by `cargo build --examples` (and by `cargo
/// test --workspace`) next to the test executable's profile directory.
fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("examples").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --examples` before the tests",
        bin.display()
    );
    bin
}

/// A running example and the device it printed.
struct Running {
    name: &'static str,
    child: Child,
    device: PathBuf,
    /// What the kernel calls the device: `loop3`, `fuseblk0`.
    kernel_name: String,
}

impl Running {
    /// Starts `examples/NAME ARGS` and waits for the device path it prints.
    fn start(name: &'static str, args: &[&str]) -> Running {
        assert_root();
        let mut child = Command::new(example_bin(name))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let line = receiver.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("{name} printed no device within {PATIENCE:?}")
        });
        let path = line.trim();
        if !path.starts_with("/dev/") {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            let mut stderr = String::new();
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut stderr);
            panic!("{name} printed {line:?} and ended with {status}: {stderr}");
        }
        let device = PathBuf::from(path);
        let kernel_name = device
            .file_name()
            .and_then(|n| n.to_str())
            .expect("device name")
            .to_owned();
        let running = Running {
            name,
            child,
            device,
            kernel_name,
        };
        assert!(
            running.sysfs().exists(),
            "{}: no {}",
            running.name,
            running.sysfs().display()
        );
        if let Some(backing) = running.loop_backing_file() {
            assert!(
                backing.starts_with(&running.mountpoint_prefix()),
                "{}'s loop device is bound to {backing}",
                running.name
            );
        }
        running
    }

    fn device(&self) -> &Path {
        &self.device
    }

    fn sysfs(&self) -> PathBuf {
        Path::new("/sys/block").join(&self.kernel_name)
    }

    /// The file a loop device is bound to; `None` for a module device.
    fn loop_backing_file(&self) -> Option<String> {
        self.kernel_name.starts_with("loop").then(|| {
            fs::read_to_string(self.sysfs().join("loop/backing_file"))
                .unwrap_or_default()
                .trim_end()
                .to_owned()
        })
    }

    /// Where the stock path mounts this process's devices:
    /// `/run/fuse-blk.NAME.PID.N`.
    fn mountpoint_prefix(&self) -> String {
        format!("/run/fuse-blk.{}.{}.", self.name, self.child.id())
    }

    /// Sends SIGINT, as Ctrl-C does, and waits for the program to end.
    fn interrupt(mut self) -> Stopped {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} still runs {PATIENCE:?} after SIGINT", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        let _ = self
            .child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr);
        Stopped {
            status,
            stderr,
            running: self,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that failed half way: end the program, which detaches.
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = self.child.wait();
        }
    }
}

struct Stopped {
    status: ExitStatus,
    stderr: String,
    running: Running,
}

impl Stopped {
    /// Asserts a clean exit and that nothing of the device is left.
    fn assert_clean(&self) {
        let name = self.running.name;
        assert!(
            self.status.success(),
            "{name} ended with {}: {}",
            self.status,
            self.stderr
        );
        let prefix = self.running.mountpoint_prefix();
        // A loop device stays in /sys/block unbound; a module device goes.
        let bound_to_us = fs::read_dir("/sys/block")
            .expect("/sys/block")
            .flatten()
            .filter_map(|entry| fs::read_to_string(entry.path().join("loop/backing_file")).ok())
            .filter(|backing| backing.starts_with(&prefix))
            .collect::<Vec<_>>();
        assert_eq!(
            bound_to_us,
            Vec::<String>::new(),
            "{name}: loop devices left"
        );
        if self.running.kernel_name.starts_with("fuseblk") {
            assert!(
                !self.running.sysfs().exists(),
                "{name}: {} left",
                self.running.device.display()
            );
        }
        let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let left: Vec<&str> = mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|mountpoint| mountpoint.starts_with(&prefix))
            .collect();
        assert_eq!(left, Vec::<&str>::new(), "{name}: mounts left");
        let dirs: Vec<String> = fs::read_dir("/run")
            .expect("/run")
            .flatten()
            .map(|entry| entry.path().display().to_string())
            .filter(|path| path.starts_with(&prefix))
            .collect();
        assert_eq!(dirs, Vec::<String>::new(), "{name}: mount points left");
    }
}

/// Reads `len` bytes at `offset` with O_DIRECT (`dd iflag=direct`), past
/// the page cache: a device that drops writes (zeros) must be asked itself.
fn read_direct(device: &Path, offset: usize, len: usize) -> Vec<u8> {
    const BS: usize = 4096;
    assert!(offset % BS == 0 && len % BS == 0, "whole blocks");
    let out = Command::new("dd")
        .arg(format!("if={}", device.display()))
        .arg(format!("bs={BS}"))
        .arg(format!("skip={}", offset / BS))
        .arg(format!("count={}", len / BS))
        .args(["iflag=direct", "status=none"])
        .stdin(Stdio::null())
        .output()
        .expect("running dd");
    assert!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout.len(), len, "dd read short");
    out.stdout
}

/// Compares device contents without printing megabytes when they differ.
fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(at) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        panic!(
            "{what}: differs first at byte {at} (block {}): {:02x?} instead of {:02x?}",
            at / 4096,
            &actual[at..(at + 16).min(actual.len())],
            &expected[at..(at + 16).min(expected.len())]
        );
    }
}

#[test]
fn zeros_reads_zeros_drops_writes_and_detaches_on_ctrl_c() {
    let zeros = Running::start("zeros", &[]);
    let size: u64 = fs::read_to_string(zeros.sysfs().join("size"))
        .expect("size")
        .trim()
        .parse()
        .expect("sectors");
    assert_eq!(size * 512, 1 << 30, "the README's 1 GiB");
    write_at(zeros.device(), 4096, &random_bytes(1, MIB)).expect("writing");
    // The page cache keeps what was written; the device itself has zeros.
    assert_same(
        &read_direct(zeros.device(), 0, 2 * MIB),
        &vec![0; 2 * MIB],
        "zeros",
    );
    assert_same(
        &read_direct(zeros.device(), (1 << 30) - 4096, 4096),
        &[0; 4096],
        "the last block",
    );
    zeros.interrupt().assert_clean();
}

#[test]
fn ramdisk_passes_fio_verify_and_keeps_an_ext4() {
    let ramdisk = Running::start("ramdisk", &["96"]);
    fio_verify(
        &ramdisk.device().display().to_string(),
        "randwrite",
        "4k",
        "64M",
    );
    let data = random_bytes(2, 3 * MIB);
    write_at(ramdisk.device(), 5 * MIB as u64, &data).expect("writing");
    assert_same(
        &read_direct(ramdisk.device(), 5 * MIB, 3 * MIB),
        &data,
        "written",
    );
    // Discards (punched holes on the stock path) read back as zeros.
    sh(
        "blkdiscard",
        &[
            "-o",
            &(5 * MIB).to_string(),
            "-l",
            &MIB.to_string(),
            ramdisk.device().to_str().unwrap(),
        ],
    );
    assert_same(
        &read_direct(ramdisk.device(), 5 * MIB, MIB),
        &vec![0; MIB],
        "discarded",
    );
    assert_same(
        &read_direct(ramdisk.device(), 6 * MIB, 2 * MIB),
        &data[MIB..],
        "next to the discarded range",
    );
    let device = ramdisk.device().to_str().unwrap();
    sh("mkfs.ext4", &["-q", "-F", device]);
    sh("e2fsck", &["-fn", device]);
    ramdisk.interrupt().assert_clean();
}

fn sha256(path: &Path) -> String {
    sh("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .expect("sum")
        .to_owned()
}

#[test]
fn overlay_keeps_writes_in_memory_and_the_image_unchanged() {
    const BLOCK: usize = 4096;
    let dir = TempDir::new("overlay");
    let image_path = dir.join("base.img");
    let image = random_bytes(3, 16 * MIB);
    fs::write(&image_path, &image).expect("image");
    let before = sha256(&image_path);

    let overlay = Running::start("overlay", &[image_path.to_str().unwrap()]);
    let device = overlay.device().to_owned();
    assert_same(
        &read_direct(&device, 0, 16 * MIB),
        &image,
        "reads fall through",
    );
    // Writes of whole blocks, and one that starts and ends mid-range.
    let first = random_bytes(4, 2 * BLOCK);
    write_at(&device, 10 * BLOCK as u64, &first).expect("writing");
    let second = random_bytes(5, MIB);
    write_at(&device, 3 * MIB as u64, &second).expect("writing");
    let mut expected = image.clone();
    expected[10 * BLOCK..12 * BLOCK].copy_from_slice(&first);
    expected[3 * MIB..4 * MIB].copy_from_slice(&second);
    // A read across written and unwritten blocks gets each from its place.
    assert_same(
        &read_direct(&device, 9 * BLOCK, 4 * BLOCK),
        &expected[9 * BLOCK..13 * BLOCK],
        "across written and unwritten blocks",
    );
    assert_same(
        &read_direct(&device, 0, 16 * MIB),
        &expected,
        "after writes",
    );
    // Discarded blocks hide the image's with zeros.
    sh(
        "blkdiscard",
        &[
            "-o",
            &(8 * MIB).to_string(),
            "-l",
            &MIB.to_string(),
            device.to_str().unwrap(),
        ],
    );
    expected[8 * MIB..9 * MIB].fill(0);
    assert_same(
        &read_direct(&device, 0, 16 * MIB),
        &expected,
        "after a discard",
    );
    fio_verify(&device.display().to_string(), "randwrite", "4k", "8M");
    assert_eq!(
        sha256(&image_path),
        before,
        "the image changed while served"
    );
    overlay.interrupt().assert_clean();
    assert_eq!(sha256(&image_path), before, "the image changed");
}

/// Runs an example that must refuse its arguments; returns its stderr
/// after checking that it made no mount point.
fn refused(name: &'static str, args: &[&str], code: i32) -> String {
    assert_root();
    let child = Command::new(example_bin(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let prefix = format!("fuse-blk.{name}.{}.", child.id());
    let out = child.wait_with_output().expect("waiting");
    assert_eq!(out.status.code(), Some(code), "{name} {args:?}: {out:?}");
    assert!(out.stdout.is_empty(), "{name} {args:?} printed a device");
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    let left: Vec<_> = fs::read_dir("/run")
        .expect("/run")
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|file| file.starts_with(&prefix))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "{name} {args:?} left in /run");
    stderr
}

#[test]
fn examples_refuse_bad_input_with_one_line() {
    let dir = TempDir::new("overlay-bad");
    assert_eq!(refused("overlay", &[], 2), "usage: overlay IMAGE\n");
    let missing = dir.join("missing.img");
    let stderr = refused("overlay", &[missing.to_str().unwrap()], 1);
    assert!(stderr.contains("No such file"), "{stderr}");
    let odd = dir.join("odd.img");
    fs::write(&odd, vec![0; 5000]).expect("image");
    let stderr = refused("overlay", &[odd.to_str().unwrap()], 1);
    assert!(
        stderr.contains("5000 bytes is not a positive multiple of 4096"),
        "{stderr}"
    );
    let stderr = refused("ramdisk", &["lots"], 2);
    assert!(stderr.contains("not a positive number of MiB"), "{stderr}");
    let stderr = refused("ramdisk", &["99999999999999"], 1);
    assert!(stderr.contains("cannot allocate"), "{stderr}");
}
