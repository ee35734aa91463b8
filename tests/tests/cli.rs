//! The `fuse-blk` command: bad input is refused with a clear one-line error
//! and leaves nothing behind; list, detach and signals do what they say.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use fuse_blk_tests::{sh, Instance, TempDir};
use serde_json::Value;

/// Runs an attach that must fail; returns its one-line message.
fn attach_fails(instance: &Instance, args: &[&str]) -> String {
    let mut full = vec!["attach"];
    full.extend_from_slice(args);
    let out = instance.run(&full);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "attach {args:?} should fail; stderr: {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    instance.assert_nothing_left();
    stderr.trim_end().to_owned()
}

#[test]
fn missing_file_is_refused() {
    let instance = Instance::new("missing");
    let message = attach_fails(&instance, &["file:/nonexistent/disk.img"]);
    assert!(message.starts_with("fuse-blk: "), "{message}");
    assert!(message.contains("/nonexistent/disk.img"), "{message}");
    assert!(message.contains("No such file"), "{message}");
}

#[test]
fn directory_is_refused() {
    let instance = Instance::new("directory");
    let dir = TempDir::new("dir-backend");
    let message = attach_fails(&instance, &[&format!("file:{}", dir.0.display())]);
    assert!(message.contains(&dir.0.display().to_string()), "{message}");
}

#[test]
fn unreadable_file_is_refused() {
    // Root reads any file; a file it cannot open is one on a path through
    // a non-directory.
    let instance = Instance::new("unreadable");
    let dir = TempDir::new("unreadable");
    let file = dir.join("plain");
    fs::write(&file, vec![0u8; 4096]).unwrap();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o000)).unwrap();
    let message = attach_fails(&instance, &[&format!("file:{}/below", file.display())]);
    assert!(message.contains("Not a directory"), "{message}");
}

#[test]
fn size_not_a_multiple_of_the_block_size_is_refused() {
    let instance = Instance::new("badsize");
    let dir = TempDir::new("badsize");
    let file = dir.join("odd.img");
    fs::write(&file, vec![0u8; 1000]).unwrap();
    let message = attach_fails(&instance, &[&format!("file:{}", file.display())]);
    assert!(
        message.contains("not a multiple of the block size 512"),
        "{message}"
    );
    let message = attach_fails(&instance, &["mem:1000"]);
    assert!(
        message.contains("not a multiple of the block size 512"),
        "{message}"
    );
    // 6 KiB is a multiple of 512 but not of 4096.
    let message = attach_fails(&instance, &["--block-size", "4096", "mem:6K"]);
    assert!(
        message.contains("not a multiple of the block size 4096"),
        "{message}"
    );
}

#[test]
fn unknown_backend_is_refused() {
    let instance = Instance::new("unknown");
    let message = attach_fails(&instance, &["floppy:1M"]);
    assert!(message.contains("unknown backend"), "{message}");
    let message = attach_fails(&instance, &["mem:12X"]);
    assert!(message.contains("12X"), "{message}");
}

#[test]
fn invalid_name_and_duplicate_name_are_refused() {
    let instance = Instance::new("names");
    let message = attach_fails(&instance, &["--name", "../etc", "mem:1M"]);
    assert!(message.contains("invalid name"), "{message}");
    let device = instance.attach(&["--name", "taken", "mem:1M"]);
    let out = instance.run(["attach", "--name", "taken", "mem:1M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already attached"));
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn kmod_transport_without_the_module_is_refused() {
    if Path::new("/dev/fuse-blk").exists() {
        return; // the module is loaded here: the transport is available
    }
    let instance = Instance::new("nokmod");
    let message = attach_fails(&instance, &["--transport", "kmod", "mem:1M"]);
    assert!(message.contains("/dev/fuse-blk"), "{message}");
}

#[test]
fn dm_user_transport_refuses_in_one_line() {
    let instance = Instance::new("dmu-transport");
    let message = attach_fails(&instance, &["--transport", "dm-user", "dm-user:inner:1M"]);
    assert!(message.contains("dm-user: backend"), "{message}");
    let message = attach_fails(
        &instance,
        &["--transport", "dm-user", "--recover", "x", "mem:1M"],
    );
    assert!(
        message.contains("no attached device named or at x"),
        "{message}"
    );
    // Where neither dm-user's target nor CUSE is, nothing can serve a
    // node: the message names both. (The bridge itself is tested in the
    // VM, case dm_user_transport.)
    if Path::new("/dev/cuse").exists() || Path::new("/sys/module/dm_user").exists() {
        eprintln!(
            "SKIPPED part: this machine has /dev/cuse or dm-user, so attach --transport dm-user would serve"
        );
        return;
    }
    let message = attach_fails(&instance, &["--transport", "dm-user", "mem:1M"]);
    assert!(
        message.contains("cuse") && message.contains("dm-user's device-mapper target"),
        "{message}"
    );
}

#[test]
fn bad_block_size_is_a_usage_error() {
    let instance = Instance::new("blocksize");
    let out = instance.run(["attach", "--block-size", "1000", "mem:1M"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not 512 or 4096"));
    instance.assert_nothing_left();
}

#[test]
fn attach_needs_root() {
    let instance = Instance::new("notroot");
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(fuse_blk_tests::fuse_blk_bin())
        .args(["attach", "mem:1M"])
        .env("FUSE_BLK_RUNTIME_DIR", &instance.runtime_dir)
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs root"), "{stderr}");
    instance.assert_nothing_left();
}

#[test]
fn detach_of_an_unknown_device_is_refused() {
    let instance = Instance::new("detach-unknown");
    for target in ["nosuchdevice", "/dev/loop999"] {
        let out = instance.run(["detach", target]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim_end(),
            format!("fuse-blk: no attached device named or at {target}")
        );
    }
}

#[test]
fn list_shows_every_device_and_detach_takes_a_name_or_a_path() {
    let instance = Instance::new("list");
    let first = instance.attach(&["--name", "alpha", "mem:8M"]);
    let second = instance.attach(&["--block-size", "4096", "--read-only", "null:16M"]);
    let out = instance.run(["list", "--json"]);
    assert!(out.status.success());
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).expect("list --json is JSON");
    assert_eq!(list.len(), 2, "{list:?}");
    let alpha = list
        .iter()
        .find(|v| v["name"] == "alpha")
        .expect("alpha listed");
    assert_eq!(alpha["device"], first.path_str());
    assert_eq!(alpha["transport"], "loop");
    assert_eq!(alpha["backend"], "mem:8M");
    assert_eq!(alpha["size"], 8 << 20);
    assert_eq!(alpha["status"], "running");
    let pid = alpha["pid"].as_u64().expect("pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let other = list.iter().find(|v| v["name"] != "alpha").unwrap();
    assert_eq!(other["name"], "fuseblk0");
    assert_eq!(other["device"], second.path_str());
    assert_eq!(other["block_size"], 4096);
    assert_eq!(other["read_only"], true);

    let table = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    assert!(table.lines().next().unwrap().starts_with("NAME"));
    assert!(table.contains("alpha") && table.contains(first.path_str()));

    // By name, then by path.
    let out = instance.run(["detach", "alpha"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::mem::forget(first);
    second.detach();
    instance.assert_nothing_left();
}

#[test]
fn detach_refuses_a_mounted_device() {
    let instance = Instance::new("busy");
    let device = instance.attach(&["mem:64M"]);
    sh("mkfs.ext4", &["-q", device.path_str()]);
    let mnt = TempDir::new("busy-mnt");
    sh("mount", &[device.path_str(), mnt.0.to_str().unwrap()]);
    let out = instance.run(["detach", device.path_str()]);
    sh("umount", &[mnt.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
    device.detach();
    instance.assert_nothing_left();
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_detaches_cleanly() {
    let instance = Instance::new("sigterm");
    let device = instance.attach(&["mem:16M"]);
    fuse_blk_tests::write_at(&device.path, 0, &[7u8; 4096]).unwrap();
    let pids = instance.daemons();
    assert_eq!(pids.len(), 1);
    sh("kill", &["-TERM", &pids[0].to_string()]);
    wait_until("the daemon to exit", || instance.daemons().is_empty());
    std::mem::forget(device);
    instance.assert_nothing_left();
}

#[test]
fn a_killed_daemon_is_cleaned_up_by_detach() {
    let instance = Instance::new("sigkill");
    let device = instance.attach(&["--name", "victim", "mem:16M"]);
    let pids = instance.daemons();
    assert_eq!(pids.len(), 1);
    sh("kill", &["-KILL", &pids[0].to_string()]);
    wait_until("the daemon to die", || instance.daemons().is_empty());
    // The device fails I/O instead of hanging.
    assert!(fuse_blk_tests::write_at(&device.path, 0, &[1u8; 4096]).is_err());
    let list = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    assert!(
        list.lines()
            .any(|l| l.starts_with("victim") && l.ends_with("dead")),
        "{list}"
    );
    let out = instance.run(["detach", "victim"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::mem::forget(device);
    instance.assert_nothing_left();
}

#[test]
fn a_daemon_run_from_a_renamed_binary_is_detached_not_taken_for_dead() {
    // The record names its daemon by pid and start time, not by the name
    // of the executable (a packager may install it under another name).
    let instance = Instance::new("renamed");
    let dir = TempDir::new("renamed-bin");
    let renamed = dir.join("blockd");
    // A hard link never has a writable descriptor: a copy's, inherited by a
    // child that another test thread forks before it execs, makes running
    // the copy fail with ETXTBSY until that child has exec'd.
    let copied = fs::hard_link(fuse_blk_tests::fuse_blk_bin(), &renamed).is_err();
    if copied {
        fs::copy(fuse_blk_tests::fuse_blk_bin(), &renamed).unwrap();
    }
    let run_renamed = || {
        std::process::Command::new(&renamed)
            .env("FUSE_BLK_RUNTIME_DIR", &instance.runtime_dir)
            .args(["attach", "--name", "renamed", "mem:16M"])
            .stdin(std::process::Stdio::null())
            .output()
    };
    let mut out = run_renamed();
    for _ in 0..100 {
        match &out {
            Err(e) if copied && e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
                out = run_renamed();
            }
            _ => break,
        }
    }
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Detached on drop should an assertion fail before the detach below.
    let device = instance.adopt(String::from_utf8(out.stdout).unwrap().trim());
    let list: Vec<Value> =
        serde_json::from_slice(&instance.run(["list", "--json"]).stdout).unwrap();
    assert_eq!(list[0]["status"], "running", "{list:?}");
    let pid = list[0]["pid"].as_u64().unwrap();
    fuse_blk_tests::write_at(&device.path, 0, &[3u8; 4096]).unwrap();

    let out = instance.run(["detach", "renamed"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("had died"), "{stderr}");
    // detach returns once the daemon has exited on its own.
    assert!(!Path::new(&format!("/proc/{pid}/exe")).exists());
    std::mem::forget(device);
    instance.assert_nothing_left();
}

/// A process that entered a mount namespace of its own while the device was
/// attached holds a copy of the daemon's FUSE mount, which keeps the FUSE
/// connection alive after the daemon's unmount: detach must still end the
/// daemon (it once waited for that process to exit, for ever).
#[test]
fn detach_ends_the_daemon_while_another_mount_namespace_holds_a_copy() {
    let instance = Instance::new("mntns");
    let device = instance.attach(&["--transport", "loop", "--name", "mntns", "mem:16M"]);
    let mut holder = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "120"])
        .spawn()
        .expect("unshare");
    // The copy exists once the child runs in its namespace.
    let deadline = Instant::now() + Duration::from_secs(10);
    let copied = loop {
        let mounts = fs::read_to_string(format!("/proc/{}/mountinfo", holder.id()));
        if mounts.is_ok_and(|m| m.contains("mntns/mnt")) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let started = Instant::now();
    device.detach();
    let took = started.elapsed();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(copied, "the child never showed a copy of the mount");
    assert!(took < Duration::from_secs(30), "detach took {took:?}");
    instance.assert_nothing_left();
}
