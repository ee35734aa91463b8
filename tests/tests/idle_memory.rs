//! A daemon idle after large I/O gives back the memory that I/O took. Here
//! the stock path with the read/write channel: each worker thread's receive
//! and reply buffers. The io_uring transports, and the kernel module's
//! read/write channel, are checked in the guest
//! (`tests/vm/cases/idle_memory.sh`).

use std::fs;
use std::thread::sleep;
use std::time::Duration;

use fuse_blk_tests::{sh, Instance, TempDir};

const MIB: u64 = 1 << 20;

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

fn fio(device: &str, rw: &str) {
    sh(
        "fio",
        &[
            "--name=large",
            &format!("--filename={device}"),
            "--ioengine=libaio",
            "--direct=1",
            "--iodepth=16",
            "--numjobs=4",
            &format!("--rw={rw}"),
            "--bs=1M",
            "--size=64M",
            "--offset_increment=64M",
            "--group_reporting",
        ],
    );
}

#[test]
fn an_idle_read_write_daemon_gives_its_buffers_back() {
    let instance = Instance::new("idle-rw");
    let dir = TempDir::new("idle-rw");
    let image = dir.sparse_image(256 * MIB);
    let device = instance.attach(&[
        "--transport",
        "loop",
        "--io",
        "rw",
        "--threads",
        "4",
        // The data has to pass through the daemon's buffers.
        "--no-passthrough",
        &format!("file:{}", image.display()),
    ]);
    let pid = instance.daemons()[0];
    let before = rss_kib(pid);
    fio(device.path_str(), "write");
    fio(device.path_str(), "read");
    let busy = rss_kib(pid);
    // Buffers go back after a second without requests.
    sleep(Duration::from_secs(3));
    let idle = rss_kib(pid);
    eprintln!("RSS: {before} KiB before I/O, {busy} KiB after it, {idle} KiB idle");
    // The check means something only if the I/O did fill buffers: one
    // thread's 1 MiB at least.
    assert!(
        busy >= before + 1024,
        "1 MiB I/O added only {} KiB: buffers not in use?",
        busy.saturating_sub(before)
    );
    assert!(
        idle < before + 512,
        "idle again, {} KiB more resident than before any I/O",
        idle.saturating_sub(before)
    );
    device.detach();
    instance.assert_nothing_left();
}
