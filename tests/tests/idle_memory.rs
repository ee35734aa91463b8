//! A daemon idle after large I/O gives back the memory that I/O took. Here
//! the stock path with the read/write channel: each worker thread's receive
//! and reply buffers. The io_uring transports, and the kernel module's
//! read/write channel, are checked in the guest
//! (`tests/vm/cases/idle_memory.sh`).

use std::thread::sleep;
use std::time::Duration;

use fuse_blk_tests::{fio_load, status_kib, Instance, TempDir};

const MIB: u64 = 1 << 20;

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
    let before = status_kib(pid, "VmRSS");
    fio_load(device.path_str(), "write", "1M", "64M", 16, 4);
    fio_load(device.path_str(), "read", "1M", "64M", 16, 4);
    let busy = status_kib(pid, "VmRSS");
    // Buffers go back after a second without requests.
    sleep(Duration::from_secs(3));
    let idle = status_kib(pid, "VmRSS");
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
