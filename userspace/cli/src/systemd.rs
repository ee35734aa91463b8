//! Telling systemd about a device's daemon when it runs as the main
//! process of `fuse-blk@NAME.service` (`Type=notify`): `READY=1` once the
//! block device exists, and `MAINPID=` when `handoff` (`ExecReload`)
//! replaces the daemon, so that systemd follows the new one.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the socket named by
//! `$NOTIFY_SOCKET` (sd_notify(3)); the few lines here send it (why not a
//! crate: Documentation/DESIGN.md, "Devices that come back at boot").
//!
//! A daemon notifies only in its own device's unit, which it tells by its
//! cgroup: `$NOTIFY_SOCKET` is also set for the processes of other
//! services (with `NotifyAccess=all`), and a daemon started from one of
//! them by `fuse-blk attach` must not claim to be their main process.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once this daemon has told systemd it is ready.
static NOTIFYING: AtomicBool = AtomicBool::new(false);

/// The unit systemd runs device `name`'s daemon in.
pub fn unit_name(name: &str) -> String {
    format!("fuse-blk@{name}.service")
}

/// The systemd unit process `pid` (this process: None) runs in, from the
/// last component of its cgroup: `fuse-blk@data.service` for
/// `0::/system.slice/system-fuse\x2dblk.slice/fuse-blk@data.service`.
pub fn unit_of(pid: Option<u32>) -> Option<String> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/cgroup"),
        None => "/proc/self/cgroup".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // The unified hierarchy's line, else (a legacy host) systemd's own.
    let line = text
        .lines()
        .find(|line| line.starts_with("0::"))
        .filter(|line| *line != "0::/")
        .or_else(|| text.lines().find(|line| line.contains(":name=systemd:")))?;
    let last = line.rsplit('/').next()?;
    last.ends_with(".service").then(|| last.to_owned())
}

/// Whether this process is the daemon (or a successor) of device `name`
/// in its unit, under a systemd that listens.
pub fn in_unit_of(name: &str) -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some() && unit_of(None) == Some(unit_name(name))
}

/// Sends `state` (KEY=VALUE lines) to `$NOTIFY_SOCKET`.
fn send(state: &str) -> io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => send_to(&socket.to_string_lossy(), state),
        None => Ok(()),
    }
}

/// Sends `state` to the socket `socket` names: a path, or an abstract
/// name after `@`.
fn send_to(socket: &str, state: &str) -> io::Result<()> {
    let datagram = UnixDatagram::unbound()?;
    match socket.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)?;
            datagram.send_to_addr(state.as_bytes(), &address)?;
        }
        None => {
            datagram.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

fn send_or_log(state: &str) {
    if let Err(e) = send(state) {
        log::warn!("telling systemd {state:?}: {e}");
    }
}

/// The device exists and is served: this process is the unit's main
/// process from now on.
pub fn ready(name: &str, device: &str) {
    if !in_unit_of(name) {
        return;
    }
    NOTIFYING.store(true, Ordering::Relaxed);
    send_or_log(&format!(
        "MAINPID={}\nREADY=1\nSTATUS=serving {device}",
        std::process::id()
    ));
}

/// A successor that `handoff` (`ExecReload`) starts for device `name`
/// leaves it: forks, and goes on in the child once its parent has exited
/// and the manager has adopted it. systemd waits at `stop` only for a main
/// process that is its own child, and tells when it learns the pid, which
/// the successor says before the old daemon exits, while `handoff` still
/// runs. Call before any thread exists.
pub fn leave_handoff(name: &str) {
    if !in_unit_of(name) {
        return;
    }
    let parent = nix::unistd::getppid();
    let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).unwrap_or_default();
    if !cmdline
        .split(|&byte| byte == 0)
        .any(|arg| arg == b"handoff")
    {
        return;
    }
    // SAFETY: this process has a single thread (the caller's promise), so
    // the child may run on; the parent only exits.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => {
            // SAFETY: _exit ends this process without running anything
            // the child shares (buffers, atexit handlers).
            unsafe { libc::_exit(0) }
        }
        Ok(nix::unistd::ForkResult::Child) => {
            let started = std::time::Instant::now();
            let middle = nix::unistd::getppid();
            while nix::unistd::getppid() == middle
                && started.elapsed() < std::time::Duration::from_secs(5)
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Err(e) => log::warn!("leaving handoff's process: {e}"),
    }
}

/// A successor taking device `name` over from its daemon (pid
/// `old_pid`) becomes the unit's main process before it takes the device,
/// since the old daemon may exit as soon as it is displaced (systemd would
/// take the unit for stopped if its main process exited first). Dropped
/// without [`MainPid::keep`], the old daemon is the main process again.
pub struct MainPid {
    /// The old daemon, while this process stands in for it.
    old_pid: Option<u32>,
}

impl MainPid {
    pub fn take(name: &str, old_pid: u32) -> MainPid {
        if !in_unit_of(name) {
            return MainPid { old_pid: None };
        }
        send_or_log(&format!("MAINPID={}", std::process::id()));
        MainPid {
            old_pid: Some(old_pid),
        }
    }

    /// This process serves the device now.
    pub fn keep(mut self) {
        self.old_pid = None;
    }
}

impl Drop for MainPid {
    fn drop(&mut self) {
        if let Some(pid) = self.old_pid {
            send_or_log(&format!("MAINPID={pid}"));
        }
    }
}

/// Says what the daemon is doing, in `systemctl status`.
pub fn status(text: &str) {
    if NOTIFYING.load(Ordering::Relaxed) {
        send_or_log(&format!("STATUS={text}"));
    }
}

/// `handoff` by hand of a device whose daemon a unit runs would leave the
/// successor outside the unit: systemd would take the old daemon's exit for
/// the unit's end. Refused, saying what to run instead.
pub fn check_handoff(name: &str, daemon_pid: u32) -> Result<(), String> {
    let unit = unit_name(name);
    if unit_of(Some(daemon_pid)).as_ref() == Some(&unit) && unit_of(None).as_ref() != Some(&unit) {
        return Err(format!(
            "{name}: its daemon is the main process of {unit}: hand it over with `systemctl reload {unit}`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("fuse-blk-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        send_to(&path.to_string_lossy(), "READY=1\nSTATUS=test").expect("send");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=test");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_process_outside_the_unit_does_not_notify() {
        // The test runs in no fuse-blk@ unit, whatever NOTIFY_SOCKET says.
        assert!(!in_unit_of("no-such-device-here"));
    }
}
