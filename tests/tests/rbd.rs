//! `rbd:` devices end to end on the stock path, against a real one-node
//! Ceph cluster (one monitor, one manager, one OSD on BlueStore in a
//! file) that `tests/ceph/cluster` starts for each test and stops after:
//! ext4 and fio verify on the image, read back through `rbd export`;
//! write-zeroes and discard; the OSD killed and restarted under fio
//! verify; bad specs and credentials refused in one line.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use fuse_blk_tests::{random_bytes, read_at, sh, spawn_fio_verify_in, write_at, Instance, TempDir};

const MIB: u64 = 1 << 20;

/// A cluster of its own for one test, stopped (daemons killed, directory
/// removed) when dropped.
struct Cluster {
    dir: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ceph/cluster")
}

fn run_script(args: &[&str]) -> Output {
    Command::new(script())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running tests/ceph/cluster")
}

impl Cluster {
    /// Starts a cluster with the image rbd/test of `size`.
    fn start(label: &str, size: &str) -> Cluster {
        let dir =
            std::env::temp_dir().join(format!("fuse-blk-ceph-{label}-{}", std::process::id()));
        let dir_str = dir.to_str().unwrap().to_owned();
        let cluster = Cluster { dir };
        let started = Instant::now();
        let out = run_script(&["start", &dir_str, "test", size]);
        assert!(
            out.status.success(),
            "tests/ceph/cluster start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{label}: Ceph cluster up in {:.1?}", started.elapsed());
        cluster
    }

    fn conf(&self) -> String {
        self.dir.join("ceph.conf").to_str().unwrap().to_owned()
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn rbd(&self, args: &[&str]) -> String {
        let conf = self.conf();
        let mut full = vec!["--conf", conf.as_str()];
        full.extend_from_slice(args);
        sh("rbd", &full)
    }

    fn kill_osd(&self) {
        let out = run_script(&["kill-osd", self.dir_str()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start_osd(&self) {
        let out = run_script(&["start-osd", self.dir_str()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = run_script(&["stop", self.dir_str()]);
        if !out.status.success() {
            eprintln!(
                "tests/ceph/cluster stop: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn sha256(path: &str) -> String {
    sh("sha256sum", &[path])
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn fio_succeeded(fio: Child) {
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("err= 0"), "fio: {stdout}");
}

/// ext4 and fio verify on the image, then write-zeroes and discard; the
/// device's whole content is then what `rbd export` reads of the image.
#[test]
fn ext4_fio_verify_zeroes_and_rbd_export_agree() {
    let cluster = Cluster::start("rbd-export", "256M");
    let instance = Instance::new("rbd-export");
    let conf = cluster.conf();
    let device = instance.attach(&["--name", "rbd-export", "--rbd-conf", &conf, "rbd:rbd/test"]);
    let list = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    assert!(
        list.contains("rbd:rbd/test")
            && list.contains("268435456")
            && list.contains("running, 4 MiB objects, 0 in flight"),
        "{list}"
    );

    // 150 MiB of the 256: the rest is for write-zeroes and discard below.
    sh(
        "mkfs.ext4",
        &["-q", "-F", "-E", "nodiscard", device.path_str(), "150M"],
    );
    let mnt = TempDir::new("rbd-mnt");
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device.path_str(), mnt_path]);
    fio_succeeded(spawn_fio_verify_in(mnt_path, 16, 2, "24M", 8));
    sh("umount", &[mnt_path]);
    sh("e2fsck", &["-fn", device.path_str()]);

    // Past the file system's end nothing is used: data there, then
    // write-zeroes (blkdiscard -z, which the stock path also sends for a
    // punched hole) and discard over parts of it, across object bounds.
    let tail = 200 * MIB;
    let data = random_bytes(7, (16 * MIB) as usize);
    write_at(&device.path, tail, &data).unwrap();
    assert_eq!(read_at(&device.path, tail, data.len()), data);
    let zeroed = (tail + MIB + 4096, 3 * MIB);
    sh(
        "blkdiscard",
        &[
            "-z",
            "-o",
            &zeroed.0.to_string(),
            "-l",
            &zeroed.1.to_string(),
            device.path_str(),
        ],
    );
    let discarded = (tail + 8 * MIB, 5 * MIB);
    sh(
        "blkdiscard",
        &[
            "-o",
            &discarded.0.to_string(),
            "-l",
            &discarded.1.to_string(),
            device.path_str(),
        ],
    );
    let now = read_at(&device.path, tail, data.len());
    for (offset, len) in [zeroed, discarded] {
        let at = (offset - tail) as usize;
        assert!(
            now[at..at + len as usize].iter().all(|&b| b == 0),
            "not zeros at {offset}+{len}"
        );
    }
    assert_eq!(
        now[..(zeroed.0 - tail) as usize],
        data[..(zeroed.0 - tail) as usize]
    );
    let after = (zeroed.0 + zeroed.1 - tail) as usize;
    assert_eq!(
        now[after..(discarded.0 - tail) as usize],
        data[after..(discarded.0 - tail) as usize]
    );

    let device_sum = sha256(device.path_str());
    device.detach();
    instance.assert_nothing_left();
    let export = TempDir::new("rbd-export-file");
    let file = export.join("image");
    cluster.rbd(&["export", "rbd/test", file.to_str().unwrap()]);
    assert_eq!(fs::metadata(&file).unwrap().len(), 256 * MIB);
    assert_eq!(
        sha256(file.to_str().unwrap()),
        device_sum,
        "rbd export differs from the device"
    );
    sh("e2fsck", &["-fn", file.to_str().unwrap()]);
}

/// The requests librbd holds for the device, from `list`'s status
/// (`running, 4 MiB objects, N in flight`).
fn in_flight(instance: &Instance) -> usize {
    let out = instance.run(["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = list[0]["status"].as_str().unwrap_or_default().to_owned();
    status
        .strip_suffix(" in flight")
        .and_then(|rest| rest.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no requests in flight in {status:?}"))
}

/// `handoff` under fio verify on ext4: the new daemon opens the image
/// itself (librbd hands the image's exclusive lock over), the old one
/// drains; no request fails and the data stays.
#[test]
fn handoff_under_fio_verify_moves_the_image_to_a_new_daemon() {
    let cluster = Cluster::start("rbd-handoff", "128M");
    let instance = Instance::new("rbd-handoff");
    let conf = cluster.conf();
    let device = instance.attach(&["--name", "rbd-handoff", "--rbd-conf", &conf, "rbd:rbd/test"]);
    sh(
        "mkfs.ext4",
        &["-q", "-F", "-E", "nodiscard", device.path_str()],
    );
    let mnt = TempDir::new("rbd-handoff-mnt");
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device.path_str(), mnt_path]);
    let pid = |instance: &Instance| {
        let out = instance.run(["list", "--json"]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        list[0]["pid"].clone()
    };
    let before = pid(&instance);
    let fio = spawn_fio_verify_in(mnt_path, 16, 2, "24M", 12);
    thread::sleep(Duration::from_secs(4));
    let out = instance.run(["handoff", "rbd-handoff"]);
    assert!(
        out.status.success(),
        "handoff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fio_succeeded(fio);
    assert_ne!(pid(&instance), before, "the same daemon serves");
    sh("umount", &[mnt_path]);
    sh("e2fsck", &["-fn", device.path_str()]);
    device.detach();
    instance.assert_nothing_left();
}

/// The OSD killed (SIGKILL) and restarted twice under fio verify on
/// ext4: librbd holds the requests and resends them; none fails.
#[test]
fn fio_verify_while_the_osd_is_killed_and_restarted() {
    const KILLS: usize = 2;
    let cluster = Cluster::start("rbd-osd", "256M");
    let instance = Instance::new("rbd-osd");
    let conf = cluster.conf();
    let device = instance.attach(&["--name", "rbd-osd", "--rbd-conf", &conf, "rbd:rbd/test"]);
    sh(
        "mkfs.ext4",
        &["-q", "-F", "-E", "nodiscard", device.path_str()],
    );
    let mnt = TempDir::new("rbd-osd-mnt");
    let mnt_path = mnt.0.to_str().unwrap();
    sh("mount", &[device.path_str(), mnt_path]);

    let mut fio = spawn_fio_verify_in(mnt_path, 16, 2, "24M", 25);
    let mut held = 0;
    for _ in 0..KILLS {
        thread::sleep(Duration::from_secs(3));
        assert!(
            fio.try_wait().unwrap().is_none(),
            "fio ended before the kills"
        );
        cluster.kill_osd();
        // Requests pile up in librbd while no OSD serves them, and
        // fuse-blk leaves them there.
        thread::sleep(Duration::from_secs(2));
        held = held.max(in_flight(&instance));
        cluster.start_osd();
    }
    fio_succeeded(fio);
    assert!(held > 0, "no request was held while the OSD was down");
    sh("umount", &[mnt_path]);
    sh("e2fsck", &["-fn", device.path_str()]);
    let list = String::from_utf8(instance.run(["list"]).stdout).unwrap();
    assert!(
        list.contains("running, 4 MiB objects, 0 in flight"),
        "{list}"
    );
    // The device still serves after the restarts.
    let pattern = random_bytes(11, 64 * 1024);
    write_at(&device.path, 250 * MIB, &pattern).unwrap();
    assert_eq!(read_at(&device.path, 250 * MIB, pattern.len()), pattern);
    device.detach();
    instance.assert_nothing_left();
}

/// Malformed specs, a missing pool or image, wrong credentials, a
/// cluster that does not answer, a missing configuration: each one line
/// naming the cause, exit non-zero, nothing left; the unreachable
/// cluster within the connect bound, not a hang.
#[test]
fn bad_rbd_backends_are_one_line_errors_leaving_nothing() {
    let cluster = Cluster::start("rbd-bad", "16M");
    let instance = Instance::new("rbd-bad");
    let dir = TempDir::new("rbd-bad");
    let conf = cluster.conf();
    let bad_key = dir.join("bad.keyring");
    sh(
        "ceph-authtool",
        &[
            "--create-keyring",
            bad_key.to_str().unwrap(),
            "--gen-key",
            "-n",
            "client.admin",
        ],
    );
    let unreachable = dir.join("unreachable.conf");
    let text = fs::read_to_string(&conf).unwrap();
    let text: String = text
        .lines()
        .map(|line| {
            if line.starts_with("mon host") {
                // A port nothing listens on: connections are refused,
                // and librados keeps trying until its timeout.
                "mon host = [v2:127.0.0.1:1]".to_owned()
            } else {
                line.to_owned()
            }
        })
        .map(|line| line + "\n")
        .collect();
    fs::write(&unreachable, text).unwrap();
    let bad_key = bad_key.to_str().unwrap();
    let unreachable = unreachable.to_str().unwrap();
    let missing = dir.join("missing.conf");
    let missing = missing.to_str().unwrap();
    cluster.rbd(&["namespace", "create", "rbd/ns1"]);
    let cases: [(&[&str], &str, &str); 11] = [
        (&["--rbd-conf", &conf], "rbd:image", "rbd:POOL/IMAGE"),
        (
            &["--rbd-conf", &conf],
            "rbd:/test",
            "the pool name is missing",
        ),
        (
            &["--rbd-conf", &conf],
            "rbd:rbd/",
            "the image name is missing",
        ),
        (&["--rbd-conf", &conf], "rbd:rbd/test@snap", "not a name"),
        (
            &["--rbd-conf", &conf],
            "rbd:nopool/test",
            "the pool nopool does not exist",
        ),
        (
            &["--rbd-conf", &conf],
            "rbd:rbd/nothing",
            "no image nothing in pool rbd",
        ),
        (
            &["--rbd-conf", &conf],
            "rbd:rbd/nons/test",
            "no image test in pool rbd namespace nons",
        ),
        (
            &["--rbd-conf", &conf],
            "rbd:rbd/ns1/test",
            "no image test in pool rbd namespace ns1",
        ),
        (
            &["--rbd-conf", &conf, "--rbd-keyring", bad_key],
            "rbd:rbd/test",
            "refused client.admin's credentials",
        ),
        (
            &["--rbd-conf", unreachable],
            "rbd:rbd/test",
            "no answer from the cluster's monitors",
        ),
        (
            &["--rbd-conf", missing],
            "rbd:rbd/test",
            "missing.conf: No such file",
        ),
    ];
    for (options, spec, cause) in cases {
        let mut args = vec!["attach"];
        args.extend_from_slice(options);
        args.push(spec);
        let started = Instant::now();
        let out = instance.run(&args);
        let took = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: attached");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("fuse-blk: {spec}: ")) && stderr.contains(cause),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: printed {:?}", out.stdout);
        // The connect bound is 10 s; a busy machine gets slack, a hang
        // does not.
        assert!(took < Duration::from_secs(60), "{args:?}: took {took:?}");
        instance.assert_nothing_left();
    }
    // An image in a namespace is served.
    cluster.rbd(&["create", "--size", "8M", "rbd/ns1/test"]);
    let device = instance.attach(&["--rbd-conf", &conf, "rbd:rbd/ns1/test"]);
    let data = random_bytes(5, 4096);
    write_at(&device.path, 4096, &data).unwrap();
    assert_eq!(read_at(&device.path, 4096, data.len()), data);
    device.detach();
    instance.assert_nothing_left();
    // The client id that has no key.
    let out = instance.run([
        "attach",
        "--rbd-conf",
        &conf,
        "--rbd-id",
        "nobody",
        "rbd:rbd/test",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("client.nobody"), "{stderr}");
    instance.assert_nothing_left();
}

/// Whether the kernel can serve `rbd-nbd` (the nbd driver, built in or
/// loadable), and why not.
fn nbd_driver() -> Result<(), String> {
    if std::path::Path::new("/sys/module/nbd").exists() {
        return Ok(());
    }
    let out = Command::new("modprobe").arg("nbd").output();
    match out {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Err(e) => Err(format!("modprobe: {e}")),
    }
}

/// What fuse-blk wrote, `rbd-nbd` (Ceph's own userspace block device,
/// the tool users have today) reads back, and the other way round.
/// Skipped, loudly, where the kernel has no nbd driver (this project's
/// test host: no modules to load).
#[test]
fn rbd_nbd_and_fuse_blk_see_the_same_image() {
    if let Err(why) = nbd_driver() {
        eprintln!("SKIP: rbd-nbd comparison: the kernel has no nbd driver ({why})");
        return;
    }
    let cluster = Cluster::start("rbd-nbd", "64M");
    let instance = Instance::new("rbd-nbd");
    let conf = cluster.conf();
    let ours = random_bytes(21, (4 * MIB) as usize);
    let device = instance.attach(&["--rbd-conf", &conf, "rbd:rbd/test"]);
    write_at(&device.path, 3 * MIB, &ours).unwrap();
    device.detach();

    let mapped = sh("rbd-nbd", &["map", "--conf", &conf, "rbd/test"]);
    let nbd = PathBuf::from(mapped.trim());
    let theirs = random_bytes(22, (4 * MIB) as usize);
    let seen = read_at(&nbd, 3 * MIB, ours.len());
    write_at(&nbd, 20 * MIB, &theirs).unwrap();
    sh("rbd-nbd", &["unmap", nbd.to_str().unwrap()]);
    assert!(seen == ours, "rbd-nbd reads other data than fuse-blk wrote");

    let device = instance.attach(&["--rbd-conf", &conf, "rbd:rbd/test"]);
    assert!(
        read_at(&device.path, 20 * MIB, theirs.len()) == theirs,
        "fuse-blk reads other data than rbd-nbd wrote"
    );
    device.detach();
    instance.assert_nothing_left();
}
