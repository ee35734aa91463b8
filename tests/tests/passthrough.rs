//! FUSE passthrough on the stock path: the reads and writes of a `file:`
//! device go from the kernel straight to its image, so they complete while
//! the daemon is stopped; with `--no-passthrough` they wait for it. A
//! successor daemon keeps the passthrough registration of its predecessor.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fuse_blk_tests::{random_bytes, Instance, TempDir};

const MIB: usize = 1 << 20;

/// Stops processes with SIGSTOP and lets them go on when dropped, so that
/// a failing assertion does not leave a daemon stopped.
struct Stopped(Vec<u32>);

impl Stopped {
    fn new(pids: Vec<u32>) -> Stopped {
        assert!(!pids.is_empty(), "no daemon to stop");
        for &pid in &pids {
            signal(pid, libc::SIGSTOP);
        }
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &pid in &self.0 {
            signal(pid, libc::SIGCONT);
        }
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    let ret = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(ret, 0, "kill({pid}, {signal})");
}

/// Starts `dd` copying 4 MiB between `from` and `to` with direct I/O on
/// the device side, at MiB `offset` of the device.
fn dd_direct(from: &Path, to: &Path, to_device: bool, offset: usize) -> Child {
    let mut args = vec![
        format!("if={}", from.display()),
        format!("of={}", to.display()),
        "bs=1M".into(),
        "count=4".into(),
        "status=none".into(),
    ];
    if to_device {
        args.extend([format!("seek={offset}"), "oflag=direct".into()]);
    } else {
        args.extend([format!("skip={offset}"), "iflag=direct".into()]);
    }
    Command::new("dd")
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .expect("dd")
}

/// Whether `child` exits successfully within `limit`; panics if it fails.
fn finishes_within(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "dd failed: {status}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Runs [`dd_direct`] and asserts that it succeeds within 20 s; `what`
/// names the copy in the failure.
fn dd_completes(from: &Path, to: &Path, to_device: bool, offset: usize, what: &str) {
    let mut dd = dd_direct(from, to, to_device, offset);
    assert!(
        finishes_within(&mut dd, Duration::from_secs(20)),
        "{what} did not complete"
    );
}

/// What `list --json` says of the instance's one device; the table must
/// say the same (`loop+pt`).
fn listed_passthrough(instance: &Instance) -> bool {
    let out = instance.run(["list", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(list.len(), 1, "{list:?}");
    let passthrough = list[0]["passthrough"].as_bool().unwrap_or(false);
    let table = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    assert_eq!(table.contains(" loop+pt "), passthrough, "{table}");
    passthrough
}

/// Writes 4 MiB at MiB 8 and reads them back with the daemon stopped.
fn io_while_stopped(instance: &Instance, device: &Path, scratch: &TempDir) {
    let data = random_bytes(11, 4 * MIB);
    let source = scratch.join("source");
    fs::write(&source, &data).unwrap();
    let copy = scratch.join("copy");
    // The first write to the file asks the daemon once whether it carries
    // privileges to drop (GETXATTR security.capability); the rest do not.
    dd_completes(&source, device, true, 8, "the first write");
    {
        let _stopped = Stopped::new(instance.daemons());
        dd_completes(&source, device, true, 8, "a write with the daemon stopped");
        dd_completes(device, &copy, false, 8, "a read with the daemon stopped");
    }
    assert!(fs::read(&copy).unwrap() == data, "data read back differs");
}

#[test]
fn passthrough_io_goes_on_while_the_daemon_is_stopped() {
    let instance = Instance::new("passthrough");
    let dir = TempDir::new("passthrough");
    let image = dir.sparse_image(64 * MIB as u64);
    let device = instance.attach(&[&format!("file:{}", image.display())]);
    assert!(listed_passthrough(&instance));
    io_while_stopped(&instance, &device.path, &dir);
    device.detach();
    let bytes = fs::read(&image).unwrap();
    assert!(
        bytes[8 * MIB..12 * MIB] == random_bytes(11, 4 * MIB)[..],
        "the image does not hold what was written"
    );
    instance.assert_nothing_left();
}

#[test]
fn without_passthrough_io_waits_for_the_daemon() {
    let instance = Instance::new("no-passthrough");
    let dir = TempDir::new("no-passthrough");
    let image = dir.sparse_image(64 * MIB as u64);
    let device = instance.attach(&["--no-passthrough", &format!("file:{}", image.display())]);
    assert!(!listed_passthrough(&instance));
    let data = random_bytes(12, 4 * MIB);
    let source = dir.join("source");
    fs::write(&source, &data).unwrap();
    let mut write;
    {
        let _stopped = Stopped::new(instance.daemons());
        write = dd_direct(&source, &device.path, true, 0);
        assert!(
            !finishes_within(&mut write, Duration::from_secs(2)),
            "a write completed without the daemon"
        );
    }
    assert!(finishes_within(&mut write, Duration::from_secs(30)));
    device.detach();
    assert!(fs::read(&image).unwrap()[..4 * MIB] == data[..]);
    instance.assert_nothing_left();
}

#[test]
fn a_successor_daemon_keeps_passthrough() {
    let instance = Instance::new("passthrough-handoff");
    let dir = TempDir::new("passthrough-handoff");
    let image = dir.sparse_image(64 * MIB as u64);
    let device = instance.attach(&["--name", "pt", &format!("file:{}", image.display())]);
    let first = instance.daemons();
    for i in 0..3 {
        let out = instance.run(["handoff", "pt"]);
        assert!(
            out.status.success(),
            "handoff {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_ne!(instance.daemons(), first, "the daemon was replaced");
    assert!(listed_passthrough(&instance));
    io_while_stopped(&instance, &device.path, &dir);
    // A new open of the device file must name the same registration as
    // the loop driver's (the kernel refuses a mix): the successor's reply
    // does.
    let file = instance.runtime_dir.join("pt/mnt/device");
    let bytes = fs::read(&file).expect("opening the device file after handoffs");
    assert!(bytes[8 * MIB..12 * MIB] == random_bytes(11, 4 * MIB)[..]);
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn after_a_daemon_crash_reads_and_writes_go_on_and_flushes_fail() {
    let instance = Instance::new("passthrough-crash");
    let dir = TempDir::new("passthrough-crash");
    let image = dir.sparse_image(64 * MIB as u64);
    let device = instance.attach(&["--name", "crash", &format!("file:{}", image.display())]);
    let data = random_bytes(13, 4 * MIB);
    let source = dir.join("source");
    fs::write(&source, &data).unwrap();
    // The one write that asks the daemon (see io_while_stopped) first.
    dd_completes(&source, &device.path, true, 0, "the first write");
    for pid in instance.daemons() {
        signal(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !instance.daemons().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kernel still holds the image: reads and writes need no daemon.
    dd_completes(&source, &device.path, true, 16, "a write after the crash");
    let copy = dir.join("copy");
    dd_completes(&device.path, &copy, false, 16, "a read after the crash");
    assert!(fs::read(&copy).unwrap() == data);
    // A flush needs the daemon, whose connection is gone.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&device.path)
        .unwrap();
    assert!(
        file.sync_all().is_err(),
        "a flush succeeded without a daemon"
    );
    drop(file);
    let out = instance.run(["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dead"));
    device.detach();
    instance.assert_nothing_left();
}
