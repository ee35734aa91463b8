//! Handoff on the stock path: the FUSE connection moves to a new daemon
//! while the device is mounted and under a verifying load, without an I/O
//! error. The load goes through the daemons (`--no-passthrough`); handoff
//! with passthrough is in passthrough.rs.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use fuse_blk_tests::{sh, Instance, TempDir};

const MIB: u64 = 1 << 20;

/// Runs verifying fio jobs in `dir` one after another until `stop`;
/// returns the output of any that failed.
fn verify_load(dir: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let mut runs = 0;
        let mut failures = Vec::new();
        while !stop.load(Ordering::Acquire) {
            runs += 1;
            let out = Command::new("fio")
                .args([
                    "--name=verify",
                    &format!("--directory={dir}"),
                    "--ioengine=libaio",
                    "--direct=1",
                    "--iodepth=16",
                    "--rw=randwrite",
                    "--bs=4k",
                    "--size=16M",
                    "--verify=crc32c",
                    "--verify_fatal=1",
                    "--do_verify=1",
                    "--randrepeat=0",
                    "--verify_state_save=0",
                ])
                .stdin(Stdio::null())
                .output()
                .expect("fio");
            if !out.status.success() {
                failures.push(String::from_utf8_lossy(&out.stdout).into_owned());
            }
        }
        (runs, failures)
    })
}

#[test]
fn twenty_handoffs_under_load_without_an_error() {
    let instance = Instance::new("handoff");
    let dir = TempDir::new("handoff-image");
    let image = dir.sparse_image(256 * MIB);
    let device = instance.attach(&[
        "--name",
        "ho",
        "--no-passthrough",
        "--block-size",
        "4096",
        &format!("file:{}", image.display()),
    ]);
    sh("mkfs.ext4", &["-q", device.path_str()]);
    let mnt = TempDir::new("handoff-mnt");
    let mnt_path = mnt.0.to_str().unwrap().to_owned();
    sh("mount", &[device.path_str(), &mnt_path]);

    let stop = Arc::new(AtomicBool::new(false));
    let load = verify_load(mnt_path.clone(), stop.clone());
    let mut pids = Vec::new();
    for i in 0..20 {
        let out = instance.run(["handoff", "ho"]);
        assert!(
            out.status.success(),
            "handoff {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pids.extend(instance.daemons());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    stop.store(true, Ordering::Release);
    let (runs, failures) = load.join().unwrap();
    assert!(
        failures.is_empty(),
        "fio failed under handoffs:\n{}",
        failures.join("\n")
    );
    assert!(runs >= 1);
    pids.sort();
    pids.dedup();
    assert!(
        pids.len() >= 20,
        "the daemon was replaced each time: {pids:?}"
    );

    sh("umount", &[&mnt_path]);
    sh("e2fsck", &["-fn", device.path_str()]);
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn handoff_refuses_what_cannot_be_handed_over() {
    let instance = Instance::new("handoff-refused");
    let device = instance.attach(&["--name", "inmem", "mem:8M"]);
    let out = instance.run(["handoff", "inmem"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be handed over"));
    let out = instance.run(["handoff", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    device.detach();

    // A stock-path daemon that died took its FUSE connection with it.
    let dir = TempDir::new("handoff-dead");
    let image = dir.sparse_image(8 * MIB);
    let backend = format!("file:{}", image.display());
    let device = instance.attach(&["--name", "gone", &backend]);
    let pids = instance.daemons();
    sh("kill", &["-KILL", &pids[0].to_string()]);
    while !instance.daemons().is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = instance.run(["attach", "--recover", "gone", &backend]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("its FUSE connection went with it"),
        "{stderr}"
    );
    device.detach();
    instance.assert_nothing_left();
}

/// Threads of process `pid` serving a channel of the FUSE connection.
fn channel_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("fuse-blk-q"))
        })
        .count()
}

#[test]
fn the_successor_serves_as_its_predecessor() {
    let instance = Instance::new("handoff-options");
    let dir = TempDir::new("handoff-options");
    let image = dir.sparse_image(8 * MIB);
    // Not the default (one per CPU, at least 2): the successor only has
    // as many if `handoff` passed them on.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2)) + 1;
    let device = instance.attach(&[
        "--name",
        "opts",
        "--threads",
        &threads.to_string(),
        "--ring-poll-us",
        "7",
        &format!("file:{}", image.display()),
    ]);
    let first = instance.daemons();
    assert_eq!(channel_threads(first[0]), threads);

    let out = instance.run(["handoff", "opts"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = instance.daemons();
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    assert_eq!(channel_threads(second[0]), threads);
    let list: Vec<serde_json::Value> =
        serde_json::from_slice(&instance.run(["list", "--json"]).stdout).unwrap();
    assert_eq!(list[0]["pid"], second[0]);
    assert_eq!(list[0]["threads"], threads);
    assert_eq!(list[0]["io"], "rw");
    assert_eq!(list[0]["ring_poll_us"], 7);
    device.detach();
    instance.assert_nothing_left();
}
