//! Helpers shared by the integration tests. They run as root on the host
//! and drive the real `fuse-blk` binary, loop devices and file systems.
//!
//! Each test gets a runtime directory of its own (`FUSE_BLK_RUNTIME_DIR`),
//! so that `list` and the leftover checks see only that test's devices.

pub mod image_fs;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The `fuse-blk` binary: `$FUSE_BLK_BIN`, or the one cargo built next to
/// the test executable (`target/<profile>/fuse-blk`).
pub fn fuse_blk_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("FUSE_BLK_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("fuse-blk");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        bin.display()
    );
    bin
}

pub fn assert_root() {
    assert!(
        nix_is_root(),
        "the integration tests create block devices and must run as root"
    );
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// An isolated fuse-blk instance: its own runtime directory.
pub struct Instance {
    pub runtime_dir: PathBuf,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Instance {
    pub fn new(test: &str) -> Instance {
        assert_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let runtime_dir = PathBuf::from(format!(
            "/run/fuse-blk-test/{test}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&runtime_dir);
        fs::create_dir_all(&runtime_dir).expect("runtime dir");
        Instance { runtime_dir }
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(fuse_blk_bin());
        command.env("FUSE_BLK_RUNTIME_DIR", &self.runtime_dir);
        command
    }

    /// Runs `fuse-blk ARGS` and returns its output.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running fuse-blk")
    }

    /// Attaches and returns the device path; panics with the error if the
    /// attach fails.
    pub fn attach(&self, args: &[&str]) -> Device<'_> {
        let mut full = vec!["attach"];
        full.extend_from_slice(args);
        let out = self.run(&full);
        assert!(
            out.status.success(),
            "fuse-blk {full:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8(out.stdout).expect("utf-8");
        self.adopt(path.trim())
    }

    /// A device attached some other way (e.g. by another binary), detached
    /// when dropped like one from [`attach`](Instance::attach).
    pub fn adopt(&self, path: &str) -> Device<'_> {
        assert!(path.starts_with("/dev/"), "attach printed {path:?}");
        Device {
            instance: self,
            path: PathBuf::from(path),
            detached: false,
        }
    }

    /// The names of the device directories left in the runtime directory.
    pub fn device_dirs(&self) -> Vec<String> {
        fs::read_dir(&self.runtime_dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Loop devices whose backing file lies in this instance's directory.
    pub fn loop_devices(&self) -> Vec<String> {
        let prefix = self.runtime_dir.display().to_string();
        fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let backing = fs::read_to_string(entry.path().join("loop/backing_file")).ok()?;
                backing.starts_with(&prefix).then_some(name)
            })
            .collect()
    }

    /// Mounts under this instance's directory.
    pub fn mounts(&self) -> Vec<String> {
        let prefix = self.runtime_dir.display().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split(' ').nth(4).map(str::to_owned))
            .filter(|mountpoint| mountpoint.starts_with(&prefix))
            .collect()
    }

    /// Daemons started for this instance that are still running.
    pub fn daemons(&self) -> Vec<u32> {
        let needle = format!("FUSE_BLK_RUNTIME_DIR={}", self.runtime_dir.display());
        fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != std::process::id())
            .filter(|pid| {
                let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'));
                !zombie
                    && environ
                        .split(|&b| b == 0)
                        .any(|var| var == needle.as_bytes())
            })
            .collect()
    }

    /// Asserts that nothing of this instance is left: no device directory,
    /// no loop device, no mount, no daemon.
    pub fn assert_nothing_left(&self) {
        assert_eq!(
            self.device_dirs(),
            Vec::<String>::new(),
            "device directories left"
        );
        assert_eq!(
            self.loop_devices(),
            Vec::<String>::new(),
            "loop devices left"
        );
        assert_eq!(self.mounts(), Vec::<String>::new(), "mounts left");
        assert_eq!(self.daemons(), Vec::<u32>::new(), "daemons left");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.runtime_dir);
    }
}

/// An attached device; detached (and checked) when dropped if the test did
/// not detach it itself.
pub struct Device<'a> {
    instance: &'a Instance,
    pub path: PathBuf,
    detached: bool,
}

impl Device<'_> {
    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }

    /// Detaches and asserts success.
    pub fn detach(mut self) {
        self.detached = true;
        let out = self.instance.run(["detach", self.path_str()]);
        assert!(
            out.status.success(),
            "detach {} failed: {}",
            self.path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Device<'_> {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.instance.run(["detach", self.path_str()]);
        }
    }
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Field `field` of process `pid`'s /proc status (`VmRSS`, `RssAnon`,
/// `VmHWM`...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

/// A fio load without verification on `device`: `jobs` jobs at depth
/// `depth` (each on its own 64 MiB stretch), `rw` in blocks of
/// `block_size`, `size` each; panics with fio's output if it fails.
pub fn fio_load(device: &str, rw: &str, block_size: &str, size: &str, depth: u32, jobs: u32) {
    sh(
        "fio",
        &[
            "--name=load",
            &format!("--filename={device}"),
            "--ioengine=libaio",
            "--direct=1",
            &format!("--iodepth={depth}"),
            &format!("--numjobs={jobs}"),
            &format!("--rw={rw}"),
            &format!("--bs={block_size}"),
            &format!("--size={size}"),
            "--offset_increment=64M",
            "--group_reporting",
        ],
    );
}

/// fio writing `size` of `device` with `rw` (randwrite, randrw) in blocks
/// of `block_size`, each block checked by crc32c when read back; panics
/// with fio's output unless every block verifies.
pub fn fio_verify(device: &str, rw: &str, block_size: &str, size: &str) {
    sh(
        "fio",
        &[
            "--name=verify",
            &format!("--filename={device}"),
            "--ioengine=libaio",
            "--direct=1",
            "--iodepth=16",
            &format!("--rw={rw}"),
            &format!("--bs={block_size}"),
            &format!("--size={size}"),
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--randrepeat=0",
            "--verify_state_save=0",
        ],
    );
}

/// fio's arguments for a verifying load on files in `dir` (a file system
/// on the device under test) for `runtime_s` seconds: random 16 KiB
/// writes, each checked by crc32c as it is read back, fatal at the first
/// mismatch.
pub fn fio_verify_in_args(
    dir: &str,
    iodepth: u32,
    jobs: u32,
    size: &str,
    runtime_s: u32,
) -> Vec<String> {
    [
        "--name=verify".to_owned(),
        format!("--directory={dir}"),
        "--ioengine=libaio".to_owned(),
        "--direct=1".to_owned(),
        format!("--iodepth={iodepth}"),
        format!("--numjobs={jobs}"),
        "--rw=randwrite".to_owned(),
        "--bs=16k".to_owned(),
        format!("--size={size}"),
        "--time_based".to_owned(),
        format!("--runtime={runtime_s}"),
        "--verify=crc32c".to_owned(),
        "--verify_backlog=256".to_owned(),
        "--verify_fatal=1".to_owned(),
        "--do_verify=1".to_owned(),
        "--randrepeat=0".to_owned(),
        "--verify_state_save=0".to_owned(),
    ]
    .into()
}

/// [`fio_verify_in_args`]' load started in the background: the test
/// meanwhile kills or restarts what serves the device, then waits for the
/// child, whose output is piped for the failure message.
pub fn spawn_fio_verify_in(
    dir: &str,
    iodepth: u32,
    jobs: u32,
    size: &str,
    runtime_s: u32,
) -> Child {
    Command::new("fio")
        .args(fio_verify_in_args(dir, iodepth, jobs, size, runtime_s))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio")
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("fuse-blk-{label}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A sparse image file of `size` bytes, `disk.img` in this directory.
    pub fn sparse_image(&self, size: u64) -> PathBuf {
        let path = self.join("disk.img");
        fs::File::create(&path)
            .expect("creating the image")
            .set_len(size)
            .expect("sizing the image");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A test that failed with a file system mounted in here (its own
        // `mount`) leaves it mounted: that kept the device from being
        // detached, its daemon alive with nothing to serve, and a later
        // test's `sync` waiting on it for 20 minutes. Unmounted lazily,
        // deepest first, before the removal (which would otherwise go
        // into the mounted file system).
        for mountpoint in mounts_below(&self.0).iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mountpoint).status();
        }
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Mount points at or below `dir`, in the order /proc/self/mountinfo
/// lists them (a mount before those on top of it).
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        // mountinfo escapes spaces and the like as octal; test directories
        // have none.
        .map(PathBuf::from)
        .filter(|mountpoint| mountpoint.starts_with(dir))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), so that a failure can be
/// reproduced from its seed.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads `len` bytes at `offset` of a block device, bypassing the cache.
pub fn read_at(device: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = fs::File::open(device).expect("open device");
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("read device");
    buf
}

/// The size the kernel gives block device `device` (`/dev/NAME`), in
/// bytes, from sysfs.
pub fn kernel_size(device: &Path) -> u64 {
    let name = device.file_name().expect("a device name").to_string_lossy();
    let sectors: u64 = fs::read_to_string(format!("/sys/block/{name}/size"))
        .expect("sysfs size")
        .trim()
        .parse()
        .expect("sectors");
    sectors * 512
}

/// Writes `data` at `offset` of a block device and syncs it.
pub fn write_at(device: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new().write(true).open(device)?;
    file.write_all_at(data, offset)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file system left mounted in a temporary directory (a failed
    /// test's) is unmounted when the directory goes.
    #[test]
    fn a_temp_dir_unmounts_what_was_left_mounted_in_it() {
        assert_root();
        let dir = TempDir::new("tempdir-mount");
        let mnt = dir.join("mnt");
        fs::create_dir(&mnt).unwrap();
        sh("mount", &["-t", "tmpfs", "tmpfs", mnt.to_str().unwrap()]);
        let path = dir.0.clone();
        assert_eq!(mounts_below(&path), [mnt]);
        drop(dir);
        assert!(mounts_below(&path).is_empty(), "still mounted");
        assert!(!path.exists(), "{} left", path.display());
    }
}
