//! dm-user's own device-mapper target, where the kernel has it (Android's
//! kernels, or one with the public dm-user patches): made and removed with
//! dmsetup, its node `/dev/dm-user/NAME` served through [`crate::channel`].
//!
//! dmsetup runs as a subprocess rather than the device-mapper ioctls being
//! issued here: it is the tool the field uses for these targets, and it
//! keeps udev in step (the cookie handshake that makes udev finish with a
//! device before dmsetup returns, and making `/dev/mapper` nodes where no
//! udev runs) — work that would otherwise be written again here.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::SECTOR;

/// Where the kernel module that carries the target shows itself.
const MODULE_DIR: &str = "/sys/module/dm_user";

/// Whether the kernel's device-mapper offers the `user` target. The module
/// is loaded first where it exists but is not loaded yet (quietly: most
/// kernels have none).
pub fn available() -> bool {
    if !Path::new(MODULE_DIR).exists() {
        let _ = Command::new("modprobe")
            .args(["-q", "dm-user"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    // A kernel built with the target (not as a module) may have no
    // directory in /sys/module: device-mapper's own list says.
    Path::new(MODULE_DIR).exists() || dmsetup_lists_user_target()
}

fn dmsetup_lists_user_target() -> bool {
    let Ok(out) = Command::new("dmsetup")
        .arg("targets")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return false;
    };
    out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|line| line.split_whitespace().next() == Some("user"))
}

/// A dm-user target made here with dmsetup.
pub struct Target {
    name: String,
}

impl Target {
    /// Makes the target `NAME` of `size` bytes (read-only if `read_only`:
    /// the table is loaded so, and the block device refuses writes) with
    /// its table loaded but not
    /// yet active: its node `/dev/dm-user/NAME` exists, its block device
    /// takes no I/O until [`Target::resume`]. A daemon opens the node in
    /// between, so that nothing reading the new device (udev's probe on
    /// resume) meets dm-user's wait for a first daemon and fails. On error
    /// nothing is left.
    pub fn create(name: &str, size: u64, read_only: bool) -> io::Result<Target> {
        if size == 0 || size % SECTOR != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a dm-user target's size is a whole number of 512-byte sectors, not {size}"
                ),
            ));
        }
        let sectors = size / SECTOR;
        dmsetup(&["create", name, "--notable"])?;
        let target = Target {
            name: name.to_owned(),
        };
        let table = format!("0 {sectors} user 0 {sectors} {name}");
        let mut load = vec!["load", name, "--table", &table];
        if read_only {
            load.push("--readonly");
        }
        if let Err(e) = dmsetup(&load).and_then(|()| target.await_node()) {
            let _ = target.remove();
            return Err(e);
        }
        Ok(target)
    }

    /// The target `NAME` made earlier (by a daemon that has died since).
    pub fn existing(name: &str) -> Target {
        Target {
            name: name.to_owned(),
        }
    }

    /// The node the target's daemon serves.
    pub fn node(&self) -> PathBuf {
        PathBuf::from(format!("/dev/dm-user/{}", self.name))
    }

    /// The block device the target is.
    pub fn device_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/mapper/{}", self.name))
    }

    /// The device-mapper name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the loaded table live: the block device takes I/O.
    pub fn resume(&self) -> io::Result<()> {
        dmsetup(&["resume", &self.name])
    }

    /// Removes the target: its daemons' reads then fail with ENOTBLK.
    /// Fails while the block device is open. `--retry`: udev's probe of the
    /// device (after a descriptor opened for writing was closed) holds it
    /// open for a moment.
    pub fn remove(&self) -> io::Result<()> {
        dmsetup(&["remove", "--retry", &self.name])
    }

    /// The node is made by the target's constructor; where devtmpfs is not
    /// what makes `/dev` nodes, udev makes it a little later.
    fn await_node(&self) -> io::Result<()> {
        let node = self.node();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if std::fs::metadata(&node).is_ok_and(|m| m.file_type().is_char_device()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} did not appear", node.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `dmsetup ARGS`; its error is one line: the command and the last
/// line dmsetup wrote that says why (not its closing `Command failed.`).
fn dmsetup(args: &[&str]) -> io::Result<()> {
    let out = Command::new("dmsetup")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running dmsetup: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let why = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty() && *line != "Command failed.")
        .map(str::to_owned)
        .unwrap_or_else(|| out.status.to_string());
    Err(io::Error::other(format!(
        "dmsetup {}: {why}",
        args.first().copied().unwrap_or_default()
    )))
}
