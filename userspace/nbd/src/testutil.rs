//! NBD servers started by tests (this crate's and the integration tests'
//! in tests/): nbdkit or qemu-nbd on a unix socket, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start listening on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A server process serving on `socket`; `restart` starts it again with
/// the same command line.
pub struct Server {
    program: &'static str,
    args: Vec<String>,
    socket: PathBuf,
    /// Written by the server once it listens.
    ready: PathBuf,
    child: Option<Child>,
}

/// Fails the test, loudly, when a server the test needs is not installed:
/// a missing tool must not look like a pass.
fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: these tests need it (tests/run installs nbdkit and qemu-utils)"
    );
}

impl Server {
    /// nbdkit with `args` (plugin, its parameters, filters), serving on a
    /// unix socket in `dir`. nbdkit removes its socket as it exits, and
    /// `--exit-with-parent` ends it if the test dies.
    pub fn nbdkit(dir: &Path, args: &[&str]) -> Server {
        require("nbdkit");
        let socket = dir.join("nbdkit.sock");
        let ready = dir.join("nbdkit.pid");
        let mut full: Vec<String> = [
            "--foreground",
            "--exit-with-parent",
            "--unix",
            socket.to_str().unwrap(),
            "--pidfile",
            ready.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec();
        full.extend(args.iter().map(|a| a.to_string()));
        let mut server = Server {
            program: "nbdkit",
            args: full,
            socket,
            ready,
            child: None,
        };
        server.start();
        server
    }

    /// qemu-nbd serving `image` (raw) as export `name`.
    pub fn qemu_nbd(dir: &Path, image: &Path, name: &str, extra: &[&str]) -> Server {
        require("qemu-nbd");
        let socket = dir.join("qemu-nbd.sock");
        let ready = dir.join("qemu-nbd.pid");
        let mut args: Vec<String> = [
            "--persistent",
            "--format=raw",
            "--socket",
            socket.to_str().unwrap(),
            "--pid-file",
            ready.to_str().unwrap(),
            "--export-name",
            name,
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(image.to_str().unwrap().to_owned());
        let mut server = Server {
            program: "qemu-nbd",
            args,
            socket,
            ready,
            child: None,
        };
        server.start();
        server
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.program);
        let _ = std::fs::remove_file(&self.ready);
        let _ = std::fs::remove_file(&self.socket);
        let mut child = Command::new(self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        let start = Instant::now();
        while !(self.ready.exists() && self.socket.exists()) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{} {:?} exited at start: {status}", self.program, self.args);
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "{} did not listen within {START_TIMEOUT:?}",
                self.program
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    /// SIGKILL: the server dies mid-request, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A killed server leaves its socket; a client must find nobody
        // listening rather than a file.
        let _ = std::fs::remove_file(&self.socket);
    }

    /// SIGSTOP: the server keeps its connections and answers nothing.
    /// Returns once every thread of it has stopped: kill(2) only asks, and
    /// a thread busy at that moment could still answer a request sent
    /// right after (seen in CI: a read meant to time out was answered).
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
        let pid = self.child.as_ref().expect("the server runs").id();
        let start = Instant::now();
        while !all_threads_stopped(pid) {
            assert!(
                start.elapsed() < START_TIMEOUT,
                "{} did not stop within {START_TIMEOUT:?}",
                self.program
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("the server runs");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: kill has no memory-safety preconditions; `pid` is our
        // own child, not yet reaped, so the number is still its.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Starts the server again on the same socket; it must be from the
    /// thread that started it (`--exit-with-parent` follows that thread).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// The URI of `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether every thread of process `pid` is stopped by a signal (state
/// `T` in /proc/PID/task/TID/stat, after the command's closing parenthesis).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                == Some("T")
        })
    })
}
