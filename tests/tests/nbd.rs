//! `nbd:` devices end to end on the stock path: an NBD export served by
//! nbdkit (started here, on a unix socket) as a loop device, with ext4 and
//! fio verify on top while the server is killed and restarted.

use std::fs;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use fuse_blk_nbd::testutil::Server;
use fuse_blk_tests::{random_bytes, read_at, sh, spawn_fio_verify_in, write_at, Instance, TempDir};

const MIB: u64 = 1 << 20;

/// Server kills under the fio run.
const KILLS: usize = 3;

#[test]
fn ext4_and_fio_verify_while_nbdkit_restarts() {
    let instance = Instance::new("nbd-restart");
    let dir = TempDir::new("nbd-restart");
    let image = dir.sparse_image(256 * MIB);
    let mut server = Server::nbdkit(&dir.0, &["file", image.to_str().unwrap()]);
    let device = instance.attach(&[
        "--name",
        "nbd-restart",
        "--reconnect-timeout-ms",
        "60000",
        &server.uri(""),
    ]);
    let list = instance.run(["list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(&server.uri("")),
        "list: {}",
        String::from_utf8_lossy(&list.stdout)
    );
    sh("mkfs.ext4", &["-q", "-F", device.path_str()]);
    let mnt = TempDir::new("nbd-mnt");
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device.path_str(), mnt_path]);

    let mut fio = spawn_fio_verify_in(mnt_path, 32, 1, "48M", 12);
    for _ in 0..KILLS {
        thread::sleep(Duration::from_millis(1500));
        assert!(
            fio.try_wait().unwrap().is_none(),
            "fio ended before the kills"
        );
        server.kill();
        thread::sleep(Duration::from_millis(300));
        server.restart();
    }
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    sh("umount", &[mnt_path]);
    sh("e2fsck", &["-fn", device.path_str()]);
    let list = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    assert!(list.contains("running, connected"), "{list}");

    // Each kill broke the connections in use, and each came back.
    let log = fs::read_to_string(instance.runtime_dir.join("nbd-restart/daemon.log")).unwrap();
    let reconnected = log.matches("reconnected").count();
    assert!(
        reconnected >= KILLS,
        "{reconnected} reconnections for {KILLS} kills: {log}"
    );
    device.detach();
    instance.assert_nothing_left();
    // What the file system wrote is in the image itself.
    drop(server);
    sh("e2fsck", &["-fn", image.to_str().unwrap()]);
}

#[test]
fn requests_fail_after_the_reconnect_timeout_and_detach_works() {
    let instance = Instance::new("nbd-timeout");
    let dir = TempDir::new("nbd-timeout");
    let mut server = Server::nbdkit(&dir.0, &["memory", "size=64M"]);
    let device = instance.attach(&["--reconnect-timeout-ms", "1000", &server.uri("")]);
    sh(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={}", device.path_str()),
            "bs=4k",
            "count=16",
            "oflag=direct",
        ],
    );
    server.kill();
    let start = Instant::now();
    let out = Command::new("dd")
        .args([
            &format!("if={}", device.path_str()),
            "of=/dev/null",
            "bs=4k",
            "count=1",
            "skip=1000",
            "iflag=direct",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "read succeeded with the server gone");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    let list = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    assert!(list.contains("running, down for "), "{list}");
    device.detach();
    instance.assert_nothing_left();
}

/// A server that stops answering (SIGSTOP) but keeps its connection: the
/// command timeout gives the connection up, the reconnect timeout then
/// fails the read with EIO instead of a hang, and once the server runs
/// again the device serves again and detaches.
#[test]
fn stopped_server_times_out_commands_and_the_device_recovers() {
    let instance = Instance::new("nbd-stopped");
    let dir = TempDir::new("nbd-stopped");
    let server = Server::nbdkit(&dir.0, &["memory", "size=64M"]);
    let device = instance.attach(&[
        "--command-timeout-ms",
        "500",
        "--reconnect-timeout-ms",
        "1000",
        &server.uri(""),
    ]);
    let pattern = random_bytes(3, 4096);
    write_at(&device.path, 8192, &pattern).unwrap();
    server.pause();
    let start = Instant::now();
    let out = Command::new("dd")
        .args([
            &format!("if={}", device.path_str()),
            "of=/dev/null",
            "bs=4k",
            "count=1",
            "skip=100",
            "iflag=direct",
        ])
        .output()
        .unwrap();
    let took = start.elapsed();
    let list = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    server.resume();
    assert!(
        !out.status.success(),
        "read succeeded from a stopped server"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(list.contains("running, down for "), "{list}");
    let since = Instant::now();
    loop {
        let list = String::from_utf8(instance.run(["list"]).stdout).unwrap();
        if list.contains("running, connected") {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "no reconnection: {list}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(read_at(&device.path, 8192, 4096) == pattern);
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn read_only_export_gives_a_read_only_device() {
    let instance = Instance::new("nbd-ro");
    let dir = TempDir::new("nbd-ro");
    let server = Server::nbdkit(&dir.0, &["--readonly", "memory", "size=16M"]);
    let device = instance.attach(&[&server.uri("")]);
    assert_eq!(sh("blockdev", &["--getro", device.path_str()]).trim(), "1");
    assert_eq!(
        sh("blockdev", &["--getsize64", device.path_str()]).trim(),
        "16777216"
    );
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn bad_nbd_backends_are_one_line_errors_leaving_nothing() {
    let instance = Instance::new("nbd-bad");
    let dir = TempDir::new("nbd-bad");
    let server = Server::nbdkit(
        &dir.0,
        &[
            "--filter=exportname",
            "memory",
            "size=1M",
            "exportname=disk",
            "exportname-strict=true",
        ],
    );
    let nobody = format!(
        "nbd+unix:///disk?socket={}",
        dir.join("nobody.sock").display()
    );
    let cases = [
        (nobody.clone(), "No such file or directory"),
        (server.uri("other"), "other"),
        ("nbd+unix:///disk".to_owned(), "no socket"),
        ("nbd://:10809/disk".to_owned(), "no host"),
        ("nbd://127.0.0.1:1/disk".to_owned(), "Connection refused"),
    ];
    for (uri, cause) in cases {
        let out = instance.run(["attach", &uri]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{uri}: attached");
        assert_eq!(stderr.lines().count(), 1, "{uri}: {stderr}");
        assert!(
            stderr.starts_with(&format!("fuse-blk: {uri}: ")) && stderr.contains(cause),
            "{uri}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{uri}: printed {:?}", out.stdout);
        instance.assert_nothing_left();
    }
}

/// `handoff` moves an nbd: device to a new daemon, which connects to the
/// server itself and keeps the reconnect timeout.
#[test]
fn handoff_keeps_the_data_and_the_reconnect_timeout() {
    let instance = Instance::new("nbd-handoff");
    let dir = TempDir::new("nbd-handoff");
    let server = Server::nbdkit(&dir.0, &["memory", "size=16M"]);
    let device = instance.attach(&[
        "--name",
        "nbd-handoff",
        "--reconnect-timeout-ms",
        "45000",
        &server.uri(""),
    ]);
    let data = random_bytes(11, 1 << 20);
    write_at(&device.path, 4096, &data).unwrap();
    let list = |instance: &Instance| -> serde_json::Value {
        let out = instance.run(["list", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let before = list(&instance);
    let out = instance.run(["handoff", "nbd-handoff"]);
    assert!(
        out.status.success(),
        "handoff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = list(&instance);
    assert_ne!(before[0]["pid"], after[0]["pid"], "{after}");
    assert_eq!(after[0]["reconnect_timeout_ms"], 45000, "{after}");
    assert_eq!(after[0]["status"], "running, connected", "{after}");
    assert!(
        read_at(&device.path, 4096, 1 << 20) == data,
        "data differs after the handoff"
    );
    device.detach();
    instance.assert_nothing_left();
}

/// A daemon serving a URI without TLS loads libnbd with GnuTLS left
/// uninitialised (userspace/nbd/tests/gnutls_init.rs); one serving an
/// `nbds:` URI must not, and its TLS connection (a pre-shared key) carries
/// the data.
#[test]
fn a_tls_export_is_served_through_the_daemon() {
    let instance = Instance::new("nbd-tls");
    let dir = TempDir::new("nbd-tls");
    let psk = dir.0.join("keys.psk");
    fs::write(&psk, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let psk_arg = format!("--tls-psk={}", psk.display());
    let server = Server::nbdkit(&dir.0, &["--tls=require", &psk_arg, "memory", "size=16M"]);
    let uri = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        server.socket().display(),
        psk.display()
    );
    let device = instance.attach(&[&uri]);
    let data = random_bytes(28, 1 << 20);
    write_at(&device.path, 4096, &data).unwrap();
    assert!(
        read_at(&device.path, 4096, 1 << 20) == data,
        "data differs through the TLS connection"
    );
    device.detach();
    instance.assert_nothing_left();
}
