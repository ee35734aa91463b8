//! Online resize on the stock path (`fuse-blk resize`): a file system grown
//! with its own tool while fio verifies on it, the sizes the kernel and the
//! image show, and one-line refusals. The module's path runs the same in
//! the VM case `resize`.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use fuse_blk_tests::{kernel_size, sh, spawn_fio_verify_in, Instance, TempDir};

const MIB: u64 = 1 << 20;

/// Bytes of the file system mounted at `dir`.
fn fs_bytes(dir: &Path) -> u64 {
    let stat = nix::sys::statvfs::statvfs(dir).unwrap();
    stat.blocks() * stat.fragment_size()
}

fn resize(instance: &Instance, target: &str, size: &str) -> Result<(), String> {
    let out = instance.run(["resize", target, size]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        assert!(stderr.is_empty(), "a resize that worked said {stderr:?}");
        return Ok(());
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    Err(stderr.trim_end().to_owned())
}

/// Whether this process may resize a mounted ext4 (EXT4_IOC_RESIZE_FS
/// needs CAP_SYS_RESOURCE, which containers often drop).
fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    effective & (1 << CAP_SYS_RESOURCE) != 0
}

fn wait_fio(fio: Child) {
    let out = fio.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "fio verify failed during the resize: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The one `(name, size)` in `fuse-blk list --json`.
fn listed_size(instance: &Instance, name: &str) -> u64 {
    let out = instance.run(["list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let device = list
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {list}"));
    device["size"].as_u64().unwrap()
}

#[test]
fn ext4_on_an_image_grows_online_under_fio_verify() {
    let instance = Instance::new("resize-ext4");
    let dir = TempDir::new("resize-ext4");
    let image = dir.sparse_image(256 * MIB);
    let backend = format!("file:{}", image.display());
    let device = instance.attach(&["--transport", "loop", "--name", "grow-ext4", &backend]);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh("mkfs.ext4", &["-q", "-F", device.path_str()]);
    sh("mount", &[device.path_str(), mnt.to_str().unwrap()]);
    let before = fs_bytes(&mnt);

    let fio = spawn_fio_verify_in(mnt.to_str().unwrap(), 8, 2, "32M", 15);
    std::thread::sleep(Duration::from_secs(3));
    resize(&instance, "grow-ext4", "512M").unwrap();
    assert_eq!(kernel_size(&device.path), 512 * MIB);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 512 * MIB);
    let online = has_cap_sys_resource();
    if online {
        sh("resize2fs", &[device.path_str()]);
    } else {
        eprintln!(
            "NOTE: no CAP_SYS_RESOURCE here (a container?): ext4 is grown after the unmount instead; the VM case `resize` grows it online"
        );
    }
    wait_fio(fio);
    if !online {
        sh("umount", &[mnt.to_str().unwrap()]);
        sh("e2fsck", &["-f", "-p", device.path_str()]);
        sh("resize2fs", &[device.path_str()]);
        sh("mount", &[device.path_str(), mnt.to_str().unwrap()]);
    }
    let after = fs_bytes(&mnt);
    assert!(
        after > before + 200 * MIB,
        "ext4 grew from {before} to {after} bytes only"
    );
    assert_eq!(listed_size(&instance, "grow-ext4"), 512 * MIB);

    // Mounted: shrinking is refused and nothing changes.
    let message = resize(&instance, "grow-ext4", "128M").unwrap_err();
    assert!(message.contains("in use"), "{message}");
    assert_eq!(kernel_size(&device.path), 512 * MIB);
    sh("umount", &[mnt.to_str().unwrap()]);
    sh("e2fsck", &["-f", "-n", device.path_str()]);
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn xfs_in_memory_grows_online_and_a_free_device_shrinks() {
    let instance = Instance::new("resize-xfs");
    let dir = TempDir::new("resize-xfs");
    let device = instance.attach(&["--transport", "loop", "--name", "grow-xfs", "mem:320M"]);
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh("mkfs.xfs", &["-q", "-f", device.path_str()]);
    sh("mount", &[device.path_str(), mnt.to_str().unwrap()]);
    let before = fs_bytes(&mnt);

    let fio = spawn_fio_verify_in(mnt.to_str().unwrap(), 8, 2, "32M", 15);
    std::thread::sleep(Duration::from_secs(3));
    resize(&instance, device.path_str(), "640M").unwrap();
    assert_eq!(kernel_size(&device.path), 640 * MIB);
    sh("xfs_growfs", &[mnt.to_str().unwrap()]);
    let after = fs_bytes(&mnt);
    assert!(
        after > before + 250 * MIB,
        "xfs grew from {before} to {after} bytes only"
    );
    wait_fio(fio);
    sh("umount", &[mnt.to_str().unwrap()]);
    sh("xfs_repair", &["-n", device.path_str()]);

    // Unmounted, it may shrink; what was cut off reads as zeros when it
    // grows again.
    resize(&instance, "grow-xfs", "64M").unwrap();
    assert_eq!(kernel_size(&device.path), 64 * MIB);
    resize(&instance, "grow-xfs", "640M").unwrap();
    let tail = fuse_blk_tests::read_at(&device.path, 600 * MIB, 1 << 16);
    assert!(tail.iter().all(|&b| b == 0), "the regrown end is not zeros");
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn bad_resizes_are_refused_in_one_line_and_change_nothing() {
    let instance = Instance::new("resize-bad");
    let device = instance.attach(&["--transport", "loop", "--name", "bad", "mem:16M"]);
    let refused = |target: &str, size: &str, expected: &str| {
        let message = resize(&instance, target, size).unwrap_err();
        assert!(message.starts_with("fuse-blk: "), "{message}");
        assert!(
            message.contains(expected),
            "resize {target} {size}: {message}"
        );
    };
    refused("nosuch", "1G", "nosuch");
    refused("bad", "12x", "12x");
    refused("bad", "1000", "not a multiple of the block size 512");
    refused("bad", "0", "size is zero");
    refused("bad", "1T", "cannot grow beyond");
    assert_eq!(kernel_size(&device.path), 16 * MIB);
    assert_eq!(listed_size(&instance, "bad"), 16 * MIB);
    device.detach();

    let read_only = instance.attach(&[
        "--transport",
        "loop",
        "--read-only",
        "--name",
        "ro",
        "mem:16M",
    ]);
    refused("ro", "32M", "read-only");
    assert_eq!(kernel_size(&read_only.path), 16 * MIB);
    read_only.detach();
    instance.assert_nothing_left();
}

#[test]
fn a_qcow2_image_grows_online_and_qemu_img_sees_it() {
    let instance = Instance::new("resize-qcow2");
    let dir = TempDir::new("resize-qcow2");
    let image = dir.join("grow.qcow2");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
            "64M",
        ],
    );
    let backend = format!("qcow2:{}", image.display());
    let device = instance.attach(&["--transport", "loop", "--name", "q", &backend]);
    resize(&instance, "q", "256M").unwrap();
    assert_eq!(kernel_size(&device.path), 256 * MIB);
    fuse_blk_tests::write_at(&device.path, 200 * MIB, &[0x5a; 4096]).unwrap();
    let message = resize(&instance, "q", "128M").unwrap_err();
    assert!(message.contains("shrinking"), "{message}");
    assert_eq!(kernel_size(&device.path), 256 * MIB, "a refused shrink");
    device.detach();
    sh("qemu-img", &["check", "-q", image.to_str().unwrap()]);
    let info = sh("qemu-img", &["info", image.to_str().unwrap()]);
    assert!(info.contains("(268435456 bytes)"), "{info}");
    let read = sh(
        "qemu-io",
        &["-c", "read -P 0x5a 200M 4k", image.to_str().unwrap()],
    );
    assert!(!read.contains("Pattern verification failed"), "{read}");
    instance.assert_nothing_left();
}
