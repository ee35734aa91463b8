//! What `list` and `detach` know about attached devices: one directory per
//! device under the runtime directory (`/run/fuse-blk`), holding the
//! daemon's `state.json`, its control socket, its log and the private
//! mount point of the stock path. Any process can read it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Overrides the runtime directory (tests run isolated instances).
pub const RUNTIME_DIR_ENV: &str = "FUSE_BLK_RUNTIME_DIR";
const DEFAULT_RUNTIME_DIR: &str = "/run/fuse-blk";

pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(RUNTIME_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(DEFAULT_RUNTIME_DIR);
    }
    // A user's devices (unprivileged module devices) are recorded in the
    // user's own runtime directory.
    let user_runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", nix::unistd::geteuid())));
    user_runtime.join("fuse-blk")
}

/// The record a daemon keeps of its device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceState {
    pub name: String,
    /// Block device path; empty until the device is ready.
    pub device: String,
    pub transport: String,
    pub backend: String,
    pub size: u64,
    pub block_size: u32,
    pub read_only: bool,
    pub pid: u32,
    /// When that process started (clock ticks after boot): with the pid, it
    /// names the daemon even after its pid has been reused. Records from
    /// before it was kept have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    /// The stock path's FUSE mount point (empty on the kmod path).
    pub mountpoint: String,
    /// The kernel module's device id (kmod path only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_id: Option<u32>,
    /// The kernel reads and writes the backing file itself (FUSE
    /// passthrough, or the module's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
    /// How requests reach the daemon: "uring" or "rw" (what `--io auto`
    /// chose). This and the next two are how the daemon serves, which
    /// `handoff` starts its successor with; records from before they were
    /// kept have none, and the successor then takes the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<String>,
    /// `--ring-poll-us`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_poll_us: Option<u64>,
    /// The stock path's worker threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// An NBD backend's `--reconnect-timeout-ms`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_timeout_ms: Option<u32>,
    /// An NBD backend's `--command-timeout-ms`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_timeout_ms: Option<u32>,
    /// An RBD backend's `--rbd-id`, `--rbd-conf` and `--rbd-keyring`
    /// (paths absolute), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd_conf: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd_keyring: Option<PathBuf>,
    /// A qcow2 backend's `--qcow2-l2-cache` and `--qcow2-refcount-cache`
    /// (bytes), when given, and `--qcow2-compress`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qcow2_l2_cache: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qcow2_refcount_cache: Option<usize>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qcow2_compress: bool,
}

/// The files of one device's directory.
#[derive(Debug, Clone)]
pub struct DeviceDir {
    pub path: PathBuf,
}

impl DeviceDir {
    pub fn of(name: &str) -> DeviceDir {
        DeviceDir {
            path: runtime_dir().join(name),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.path.join("state.json")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    pub fn mountpoint(&self) -> PathBuf {
        self.path.join("mnt")
    }

    pub fn log_file(&self) -> PathBuf {
        self.path.join("daemon.log")
    }

    pub fn read(&self) -> io::Result<DeviceState> {
        let text = fs::read_to_string(self.state_file())?;
        serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Replaces the state file atomically, so readers never see half of it.
    /// The new file is written under a name of this process's, since two
    /// daemons taking a device over at once both write.
    pub fn write(&self, state: &DeviceState) -> io::Result<()> {
        let tmp = self
            .path
            .join(format!("state.json.{}.tmp", std::process::id()));
        fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        fs::rename(&tmp, self.state_file())
    }

    /// Locks the directory (flock) until the returned lock is dropped, so
    /// that changes of several of its files by different processes (two
    /// daemons taking a device over at once) do not interleave.
    pub fn lock(&self) -> io::Result<nix::fcntl::Flock<fs::File>> {
        let dir = fs::File::open(&self.path)?;
        nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io::Error::from(errno))
    }

    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Checks a user-chosen device name: it names a directory and appears in
/// losetup's output, so it is kept to a safe alphabet (the one `attach`
/// of fuse-blk-attach checks).
pub use fuse_blk_attach::validate_name;

/// Creates the runtime directory (mode 0700) and the device's directory;
/// the directory's creation is what reserves the name.
pub fn reserve(name: &str) -> io::Result<Option<DeviceDir>> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(runtime_dir())?;
    let dir = DeviceDir::of(name);
    match fs::DirBuilder::new().mode(0o700).create(&dir.path) {
        Ok(()) => Ok(Some(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reserves the first free default name: fuseblk0, fuseblk1, ...
pub fn reserve_default() -> io::Result<(String, DeviceDir)> {
    for n in 0..10_000 {
        let name = format!("fuseblk{n}");
        if let Some(dir) = reserve(&name)? {
            return Ok((name, dir));
        }
    }
    Err(io::Error::other("no free device name"))
}

/// Every device directory, sorted by name.
pub fn all() -> Vec<DeviceDir> {
    let mut dirs: Vec<DeviceDir> = fs::read_dir(runtime_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| DeviceDir { path: entry.path() })
        .collect();
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    dirs
}

impl DeviceState {
    /// Whether the daemon that wrote this record still runs.
    pub fn daemon_alive(&self) -> bool {
        daemon_alive(self.pid, self.start_time)
    }

    /// The `attach` options that make another daemon serve the device the
    /// way this one does.
    pub fn serving_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(io) = &self.io {
            args.extend(["--io".to_owned(), io.clone()]);
        }
        if let Some(us) = self.ring_poll_us {
            args.extend(["--ring-poll-us".to_owned(), us.to_string()]);
        }
        if let Some(threads) = self.threads {
            args.extend(["--threads".to_owned(), threads.to_string()]);
        }
        if let Some(ms) = self.reconnect_timeout_ms {
            args.extend(["--reconnect-timeout-ms".to_owned(), ms.to_string()]);
        }
        if let Some(ms) = self.command_timeout_ms {
            args.extend(["--command-timeout-ms".to_owned(), ms.to_string()]);
        }
        if let Some(id) = &self.rbd_id {
            args.extend(["--rbd-id".to_owned(), id.clone()]);
        }
        for (option, path) in [
            ("--rbd-conf", &self.rbd_conf),
            ("--rbd-keyring", &self.rbd_keyring),
        ] {
            if let Some(path) = path {
                args.extend([option.to_owned(), path.to_string_lossy().into_owned()]);
            }
        }
        for (option, bytes) in [
            ("--qcow2-l2-cache", self.qcow2_l2_cache),
            ("--qcow2-refcount-cache", self.qcow2_refcount_cache),
        ] {
            if let Some(bytes) = bytes {
                args.extend([option.to_owned(), bytes.to_string()]);
            }
        }
        if self.qcow2_compress {
            args.push("--qcow2-compress".to_owned());
        }
        args
    }
}

/// What `/proc/PID/stat` says of a process that this module needs.
struct ProcStat {
    /// Exited; only waits for its parent to reap it.
    zombie: bool,
    /// Clock ticks after boot (`starttime`, field 22).
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields are counted after the command name, which may hold spaces
    // and parentheses: the state (field 3) first.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let zombie = fields.next()? == "Z";
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { zombie, start_time })
}

/// When process `pid` started, in clock ticks after boot.
pub fn process_start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|stat| stat.start_time)
}

/// Whether process `pid` is alive and is the daemon that started at
/// `start_time`, not a process that reused its pid. Without a start time
/// (an older record), a live process whose executable is named fuse-blk
/// is taken for it.
fn daemon_alive(pid: u32, start_time: Option<u64>) -> bool {
    let Some(stat) = proc_stat(pid) else {
        return false;
    };
    if stat.zombie {
        return false;
    }
    match start_time {
        Some(start_time) => stat.start_time == start_time,
        // After an upgrade the link reads "fuse-blk (deleted)".
        None => fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
            exe.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("fuse-blk"))
        }),
    }
}

/// Finds a device by name or by device path.
pub fn find(target: &str) -> Result<(DeviceDir, DeviceState), String> {
    let by_path = Path::new(target);
    let canonical = fs::canonicalize(by_path).ok();
    all()
        .into_iter()
        .find_map(|dir| {
            let state = dir.read().ok()?;
            let matches = state.name == target
                || (!state.device.is_empty()
                    && (state.device == target
                        || canonical.as_deref()
                            == fs::canonicalize(&state.device).ok().as_deref()));
            matches.then_some((dir, state))
        })
        .ok_or_else(|| format!("no attached device named or at {target}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_is_known_by_pid_and_start_time() {
        let me = std::process::id();
        let start = process_start_time(me).expect("own start time");
        assert_eq!(process_start_time(me), Some(start));
        assert!(daemon_alive(me, Some(start)));
        // Same pid, another start: a process that reused the pid.
        assert!(!daemon_alive(me, Some(start + 1)));
        // An older record without a start time goes by the executable's
        // name, which for this test binary is not fuse-blk.
        assert!(!daemon_alive(me, None));
    }

    #[test]
    fn an_exited_process_is_not_alive() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        let start = process_start_time(pid);
        child.wait().expect("wait");
        assert!(!daemon_alive(pid, start));
    }

    fn record() -> DeviceState {
        DeviceState {
            name: "db0".into(),
            device: "/dev/fuseblk0".into(),
            transport: "kmod".into(),
            backend: "file:/img".into(),
            size: 1 << 20,
            block_size: 512,
            read_only: false,
            pid: 1,
            start_time: None,
            mountpoint: String::new(),
            dev_id: Some(0),
            passthrough: false,
            io: None,
            ring_poll_us: None,
            threads: None,
            reconnect_timeout_ms: None,
            command_timeout_ms: None,
            rbd_id: None,
            rbd_conf: None,
            rbd_keyring: None,
            qcow2_l2_cache: None,
            qcow2_refcount_cache: None,
            qcow2_compress: false,
        }
    }

    #[test]
    fn a_successor_serves_as_its_predecessor() {
        let old = record();
        assert!(old.serving_args().is_empty(), "an old record: the defaults");
        let kmod = DeviceState {
            io: Some("rw".into()),
            ring_poll_us: Some(0),
            ..record()
        };
        assert_eq!(kmod.serving_args(), ["--io", "rw", "--ring-poll-us", "0"]);
        let stock = DeviceState {
            io: Some("rw".into()),
            ring_poll_us: Some(500),
            threads: Some(3),
            ..record()
        };
        assert_eq!(
            stock.serving_args(),
            ["--io", "rw", "--ring-poll-us", "500", "--threads", "3"]
        );
        let nbd = DeviceState {
            backend: "nbd+unix:///?socket=/run/nbd.sock".into(),
            reconnect_timeout_ms: Some(5000),
            command_timeout_ms: Some(2000),
            rbd_id: None,
            rbd_conf: None,
            rbd_keyring: None,
            ..record()
        };
        assert_eq!(
            nbd.serving_args(),
            [
                "--reconnect-timeout-ms",
                "5000",
                "--command-timeout-ms",
                "2000"
            ]
        );
        let json = serde_json::to_string(&nbd).unwrap();
        assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), nbd);
        // A qcow2 successor keeps its caches' sizes and compression.
        let qcow2 = DeviceState {
            backend: "qcow2:/var/lib/images/disk.qcow2".into(),
            qcow2_l2_cache: Some(1 << 20),
            qcow2_refcount_cache: Some(65536),
            qcow2_compress: true,
            ..record()
        };
        assert_eq!(
            qcow2.serving_args(),
            [
                "--qcow2-l2-cache",
                "1048576",
                "--qcow2-refcount-cache",
                "65536",
                "--qcow2-compress"
            ]
        );
        let json = serde_json::to_string(&qcow2).unwrap();
        assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), qcow2);
        // What is written is read back, and a record without the fields
        // (an older daemon's) still reads.
        let json = serde_json::to_string(&stock).unwrap();
        assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), stock);
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("ring_poll_us"), "{json}");
        assert_eq!(serde_json::from_str::<DeviceState>(&json).unwrap(), old);
    }

    #[test]
    fn names() {
        assert!(validate_name("db0").is_ok());
        assert!(validate_name("my-disk_1.img").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("../x").is_err());
        assert!(validate_name(".hidden").is_err());
        assert!(validate_name("-x").is_err());
        assert!(validate_name("a b").is_err());
        assert!(validate_name(&"x".repeat(49)).is_err());
    }
}
