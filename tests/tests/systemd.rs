//! `fuse-blk@.service` under a real systemd, and `fuse-blk up --all`.
//!
//! The host runs no systemd, so the test boots one: systemd as PID 1 of a
//! new PID, mount and cgroup namespace (`unshare`), in a cgroup of its own
//! on the host's cgroup2 hierarchy, with a private /run and its unit
//! directory (/etc/systemd/system) a scratch directory kept across its
//! boots. It starts only the target the test gives it, so it runs no
//! getty, udev or journal of the host's. Block devices are the host's
//! (loop devices: the stock path); the mounts on them are the namespace's.
//! `systemctl` and the test's commands run inside through nsenter.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fuse_blk_tests::{
    assert_root, fio_verify_in_args, fuse_blk_bin, kernel_size, sh, Instance, TempDir,
};

const MIB: u64 = 1 << 20;

/// The unit as shipped.
fn shipped_unit() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../userspace/cli/systemd/fuse-blk@.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The shipped unit with the binary under test and `config_dir` in place
/// of /usr/local/bin/fuse-blk and /etc/fuse-blk (each must be there).
fn unit_for_test(config_dir: &Path) -> String {
    let unit = shipped_unit();
    let bin = fuse_blk_bin().display().to_string();
    assert!(unit.contains("/usr/local/bin/fuse-blk "), "{unit}");
    assert!(unit.contains("up --foreground %i"), "{unit}");
    assert!(
        unit.contains("ConditionPathExists=/etc/fuse-blk/%i.conf"),
        "{unit}"
    );
    assert!(unit.contains("WantedBy=local-fs.target"), "{unit}");
    unit.replace("/usr/local/bin/fuse-blk ", &format!("{bin} "))
        .replace(
            "up --foreground %i",
            &format!("up --config-dir {} --foreground %i", config_dir.display()),
        )
        .replace(
            "ConditionPathExists=/etc/fuse-blk/%i.conf",
            &format!("ConditionPathExists={}/%i.conf", config_dir.display()),
        )
        // The booted systemd starts only the test's target.
        .replace("WantedBy=local-fs.target", &format!("WantedBy={TARGET}"))
}

/// Where the host's cgroup2 hierarchy is mounted, if it has one.
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mountpoint = before.split(' ').nth(4)?;
        (after.split(' ').next() == Some("cgroup2")).then(|| PathBuf::from(mountpoint))
    })
}

/// Why systemd cannot be booted here, if it cannot.
fn missing_precondition() -> Option<String> {
    for tool in [
        "/lib/systemd/systemd",
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
    ] {
        if !Path::new(tool).exists() {
            return Some(format!("{tool} is missing (tests/run installs it)"));
        }
    }
    if cgroup2_mount().is_none() {
        return Some("the host has no cgroup2 hierarchy for systemd to run in".into());
    }
    None
}

/// A systemd booted in namespaces of its own; powered off on drop.
struct Systemd {
    /// `unshare`, whose child is the namespace's PID 1.
    unshare: Child,
    /// systemd's pid on the host.
    pid: u32,
    cgroup: PathBuf,
}

const TARGET: &str = "fuse-blk-test.target";

impl Systemd {
    /// Boots systemd with `unit_dir` as /etc/systemd/system, into
    /// `fuse-blk-test.target` (which `unit_dir` gets if it has none); its
    /// own messages go to `log`.
    fn boot(unit_dir: &Path, label: &str, log: &Path) -> Result<Systemd, String> {
        let target = unit_dir.join(TARGET);
        if !target.exists() {
            std::fs::write(&target, "[Unit]\nDescription=fuse-blk test\n")
                .map_err(|e| e.to_string())?;
        }
        let cgroup = cgroup2_mount()
            .expect("checked")
            .join(format!("fuse-blk-{label}-{}", std::process::id()));
        std::fs::create_dir(&cgroup).map_err(|e| format!("{}: {e}", cgroup.display()))?;
        // Inside: a cgroup2 mount showing the new cgroup namespace's root,
        // a private /run and proc, the unit directory.
        let inside = format!(
            "set -e; mount -t tmpfs tmpfs /sys/fs/cgroup; mount -t cgroup2 cgroup2 /sys/fs/cgroup; \
             mount -t tmpfs tmpfs /run; mount -t proc proc /proc; \
             mount --bind {units} /etc/systemd/system; \
             exec env -i container=fuse-blk-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \
               /lib/systemd/systemd --system --unit={TARGET} --show-status=no --log-target=console",
            units = unit_dir.display()
        );
        let outside = format!(
            "echo $$ > {procs} && exec unshare --pid --fork --mount --cgroup --propagation private sh -c '{inside}'",
            procs = cgroup.join("cgroup.procs").display()
        );
        let unshare = Command::new("sh")
            .args(["-c", &outside])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).map_err(|e| e.to_string())?)
            .stderr(std::fs::File::create(log.with_extension("err")).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let mut systemd = Systemd {
            pid: 0,
            unshare,
            cgroup,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = systemd.unshare.try_wait() {
                let said = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
                let said = said.lines().last().unwrap_or_default().to_owned();
                return Err(format!("systemd did not boot ({status}): {said}"));
            }
            let children = std::fs::read_to_string(format!(
                "/proc/{0}/task/{0}/children",
                systemd.unshare.id()
            ))
            .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                systemd.pid = pid.parse().expect("pid");
                let state = systemd.run("systemctl", &["is-system-running"]);
                let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
                if state == "running" || state == "degraded" {
                    return Ok(systemd);
                }
            }
            // It started, so it should come up: a failure, not a skip.
            assert!(
                Instant::now() < deadline,
                "systemd did not come up within 60 s: {}",
                std::fs::read_to_string(log.with_extension("err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command inside systemd's namespaces.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid.to_string(), "-m", "-p", "--", program])
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// A command in systemd's mount namespace only (its mounts, /run and
    /// /proc): for one that may outlive a failing test, since the end of
    /// the PID namespace would wait for the test to reap it.
    fn command_in_mounts(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .args(["-t", &self.pid.to_string(), "-m", "--", program])
            .args(args)
            .stdin(Stdio::null());
        command
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args).output().expect("nsenter")
    }

    /// Runs a command inside that must succeed; its stdout.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A unit's property, as `systemctl show` gives it.
    fn property(&self, unit: &str, property: &str) -> String {
        self.ok("systemctl", &["show", "--value", "-p", property, unit])
            .trim()
            .to_owned()
    }

    /// What systemd logged (it logs to its console, the test's stderr,
    /// and has no journal here: the units' output is in the journal only
    /// when one runs, so this is systemd's status of the units).
    fn journal(&self) -> String {
        let out = self.run(
            "systemctl",
            &["status", "--no-pager", "--full", "fuse-blk@*"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The attached devices, as `fuse-blk list --json` inside says.
    fn devices(&self) -> Vec<serde_json::Value> {
        let out = self.ok(&fuse_blk_bin().display().to_string(), &["list", "--json"]);
        serde_json::from_str(&out).expect("list --json")
    }

    fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within 60 s\n{}",
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Powers systemd off (stopping every unit) and waits for it to end.
    fn power_off(&mut self) {
        if self.pid == 0 {
            return;
        }
        let _ = self.run("systemctl", &["poweroff"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.unshare.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                // SAFETY: kill(2) on the namespace's PID 1, which this
                // test started; its namespace's processes go with it.
                unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
                let _ = self.unshare.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.pid = 0;
        remove_cgroup(&self.cgroup);
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// Removes a cgroup and those below it, deepest first.
fn remove_cgroup(path: &Path) {
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(path);
}

fn device_of(systemd: &Systemd, name: &str) -> Option<serde_json::Value> {
    systemd
        .devices()
        .into_iter()
        .find(|device| device["name"] == name)
}

#[test]
fn unit_verifies_clean() {
    assert_root();
    if let Some(why) = missing_precondition() {
        eprintln!("SKIP: systemd-analyze verify: {why}");
        return;
    }
    let dir = TempDir::new("unit-verify");
    // verify wants an instance and the commands it names to exist.
    let unit = dir.join("fuse-blk@data.service");
    std::fs::write(&unit, unit_for_test(&dir.0)).expect("unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", &unit.display().to_string()])
        .current_dir(&dir.0)
        .output()
        .expect("systemd-analyze");
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// start: the device exists when `systemctl start` returns; reload under
/// fio verify: handed to a new daemon, which systemd follows, without an
/// error; stop while mounted: refused, saying where, and the device
/// detaches once unmounted; then a second boot brings the enabled device
/// back.
#[test]
fn unit_starts_reloads_stops_and_comes_back() {
    assert_root();
    if let Some(why) = missing_precondition() {
        eprintln!("SKIP: fuse-blk@.service under systemd: {why}");
        return;
    }
    let scratch = TempDir::new("systemd-unit");
    let units = scratch.join("units");
    let config = scratch.join("config");
    let mnt = scratch.join("mnt");
    for dir in [&units, &config, &mnt] {
        std::fs::create_dir_all(dir).expect("dir");
    }
    let image = scratch.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(256 * MIB))
        .expect("image");
    std::fs::write(
        config.join("sd0.conf"),
        format!(
            "# the test's device\nbackend = file:{}\ntransport = loop\nblock-size = 4096\nno-passthrough = yes\n",
            image.display()
        ),
    )
    .expect("config");
    std::fs::write(units.join("fuse-blk@.service"), unit_for_test(&config)).expect("unit");
    let log = scratch.join("systemd.log");
    let mut systemd = match Systemd::boot(&units, "unit", &log) {
        Ok(systemd) => systemd,
        Err(why) => {
            eprintln!("SKIP: fuse-blk@.service under systemd: cannot boot systemd here: {why}");
            return;
        }
    };
    let unit = "fuse-blk@sd0.service";

    // start: the device exists once start returns.
    systemd.ok("systemctl", &["start", unit]);
    let device = device_of(&systemd, "sd0").expect("sd0 attached once start returned");
    let path = device["device"].as_str().expect("device path").to_owned();
    assert!(
        std::fs::metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device()
        }),
        "{path} is no block device"
    );
    assert_eq!(kernel_size(Path::new(&path)), 256 * MIB);
    assert_eq!(systemd.property(unit, "ActiveState"), "active");
    let first_pid = device["pid"].as_u64().expect("pid").to_string();
    assert_eq!(systemd.property(unit, "MainPID"), first_pid);

    // handoff by hand would leave the successor outside the unit.
    let by_hand = systemd.run(&fuse_blk_bin().display().to_string(), &["handoff", "sd0"]);
    let said = String::from_utf8_lossy(&by_hand.stderr).into_owned();
    assert!(!by_hand.status.success(), "handoff by hand: {said}");
    assert_eq!(
        said.trim(),
        format!("fuse-blk: sd0: its daemon is the main process of {unit}: hand it over with `systemctl reload {unit}`")
    );
    assert_eq!(systemd.property(unit, "MainPID"), first_pid);

    // reload under a verifying load on a mounted ext4.
    sh("mkfs.ext4", &["-q", "-F", &path]);
    let mnt_str = mnt.display().to_string();
    systemd.ok("mount", &[&path, &mnt_str]);
    let fio = systemd
        .command_in_mounts(
            "fio",
            &fio_verify_in_args(&mnt_str, 16, 1, "32M", 12)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio");
    std::thread::sleep(Duration::from_secs(2));
    let mut pids = vec![first_pid.clone()];
    for _ in 0..3 {
        systemd.ok("systemctl", &["reload", unit]);
        let now = device_of(&systemd, "sd0").expect("sd0 after reload");
        let pid = now["pid"].as_u64().expect("pid").to_string();
        assert!(!pids.contains(&pid), "reload kept daemon {pid}");
        assert_eq!(
            systemd.property(unit, "MainPID"),
            pid,
            "systemd follows the new daemon"
        );
        assert_eq!(systemd.property(unit, "ActiveState"), "active");
        let old_proc = format!("/proc/{}", pids.last().expect("pid"));
        systemd.wait_for("the old daemon gone", || {
            systemd
                .run("test", &["!", "-e", &old_proc])
                .status
                .success()
        });
        pids.push(pid);
        std::thread::sleep(Duration::from_secs(1));
    }
    let out = fio.wait_with_output().expect("fio");
    assert!(
        out.status.success(),
        "fio verify across reloads: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("err= 0"));

    // stop while mounted: `down` refuses and says where; the device stays
    // and serves the filesystem; once unmounted it detaches.
    systemd.ok("systemctl", &["stop", "--no-block", unit]);
    systemd.wait_for("ExecStop refused", || {
        systemd.property(unit, "ActiveState") == "deactivating"
            && systemd.property(unit, "SubState") == "stop-sigterm"
    });
    let status = systemd.journal();
    assert!(
        status.contains("detaching once the device is no longer in use"),
        "status: {status}"
    );
    let refused = systemd.run(&fuse_blk_bin().display().to_string(), &["down", "sd0"]);
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "down while mounted: {message}");
    assert!(
        message.contains(&format!("{path} is mounted on {mnt_str}")),
        "{message}"
    );
    systemd.ok(
        "sh",
        &[
            "-c",
            &format!("echo still-here > {mnt_str}/after-stop && sync"),
        ],
    );
    assert!(
        device_of(&systemd, "sd0").is_some(),
        "detached while mounted"
    );
    systemd.ok("umount", &[&mnt_str]);
    systemd.wait_for("stopped after the unmount", || {
        systemd.property(unit, "ActiveState") != "deactivating"
    });
    assert!(
        device_of(&systemd, "sd0").is_none(),
        "still attached after stop"
    );
    sh("e2fsck", &["-fn", &image.display().to_string()]);

    // enabled, it comes back at the next boot.
    systemd.ok("systemctl", &["enable", unit]);
    systemd.power_off();
    let systemd = Systemd::boot(&units, "unit-reboot", &log).expect("second boot");
    systemd.wait_for("sd0 back after the reboot", || {
        systemd.property(unit, "ActiveState") == "active"
    });
    let back = device_of(&systemd, "sd0").expect("sd0 after the reboot");
    let back_path = back["device"].as_str().expect("path").to_owned();
    systemd.ok("mount", &[&back_path, &mnt_str]);
    let kept = systemd.ok("cat", &[&format!("{mnt_str}/after-stop")]);
    assert_eq!(kept.trim(), "still-here");
    systemd.ok("umount", &[&mnt_str]);
    systemd.ok("systemctl", &["stop", unit]);
    assert!(device_of(&systemd, "sd0").is_none());
}

/// `up --all` attaches every device described in the directory, leaves
/// those attached already alone, and reports a bad file by file and line
/// without keeping the others down; `down` detaches, refusing while the
/// device is mounted and saying where.
#[test]
fn up_all_and_down() {
    let instance = Instance::new("up-all");
    let config = TempDir::new("up-all-config");
    let mnt = TempDir::new("up-all-mnt");
    let config_dir = config.0.display().to_string();
    for name in ["one", "two"] {
        std::fs::write(
            config.join(&format!("{name}.conf")),
            "backend = mem:32M\ntransport = loop\nblock-size = 4096\n",
        )
        .expect("config");
    }
    let up_all = || instance.run(["up", "--all", "--config-dir", &config_dir]);
    let out = up_all();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = |name: &str| {
        let out = instance.run(["list", "--json"]);
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
        list.into_iter().find(|device| device["name"] == name)
    };
    let one = listed("one").expect("one attached")["device"]
        .as_str()
        .expect("path")
        .to_owned();
    assert!(listed("two").is_some(), "two attached");
    assert_eq!(kernel_size(Path::new(&one)), 32 * MIB);

    // Again, with a bad file: the attached ones stay, the bad one is named.
    std::fs::write(
        config.join("three.conf"),
        "backend = mem:32M\nqueues = lots\n",
    )
    .expect("config");
    let out = up_all();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("one: already attached"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "three: {config_dir}/three.conf:2: queues: invalid value 'lots'"
        )),
        "{stderr}"
    );
    assert!(listed("three").is_none());
    assert_eq!(
        listed("one").expect("one")["device"].as_str(),
        Some(one.as_str()),
        "one was attached again"
    );

    // down refuses while mounted, saying where; detaches after.
    sh("mkfs.ext4", &["-q", "-F", &one]);
    let mnt_str = mnt.0.display().to_string();
    sh("mount", &[&one, &mnt_str]);
    let out = instance.run(["down", "one"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    sh("umount", &[&mnt_str]);
    assert!(!out.status.success(), "down while mounted: {stderr}");
    assert_eq!(
        stderr.trim(),
        format!("fuse-blk: one: {one} is mounted on {mnt_str}: unmount it first (the device stays attached)")
    );
    assert!(listed("one").is_some(), "detached while mounted");
    for name in ["one", "two"] {
        let out = instance.run(["down", name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = instance.run(["down", "one"]);
    assert!(
        !out.status.success(),
        "down of a device that is not attached"
    );
    instance.assert_nothing_left();
}
