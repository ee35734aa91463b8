//! fuse-blk-kmod/dkms.conf: `dkms build` makes fuse_blk.ko for every
//! kernel whose headers are installed, from a copy of the module's sources
//! in a scratch source and DKMS tree (nothing goes to /usr/src or
//! /var/lib/dkms but the signing key DKMS makes once).

use std::path::{Path, PathBuf};
use std::process::Command;

use fuse_blk_tests::{assert_root, sh, TempDir};

fn kmod_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuse-blk-kmod")
}

/// Copies the module's sources (not what a build left) to `to`.
fn copy_sources(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("source dir");
    for entry in std::fs::read_dir(from).expect("fuse-blk-kmod").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if path.is_dir() {
            // The headers (include/uapi/linux), not a build's directories.
            if name == "include" || from.ancestors().any(|dir| dir.ends_with("include")) {
                copy_sources(&path, &to.join(&name));
            }
            continue;
        }
        // Not what a build left (fuse_blk.mod.c, objects, the module).
        let source = (name.ends_with(".c") && !name.ends_with(".mod.c"))
            || name.ends_with(".h")
            || ["Kbuild", "Makefile", "dkms.conf"].contains(&name.as_str());
        if source {
            std::fs::copy(&path, to.join(&name)).expect("copy");
        }
    }
}

/// The value of `KEY="VALUE"` in dkms.conf.
fn dkms_value(conf: &str, key: &str) -> String {
    conf.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("dkms.conf has no {key}"))
        .trim_matches('"')
        .to_owned()
}

#[test]
fn dkms_builds_the_module_for_every_kernel_with_headers() {
    assert_root();
    let conf = std::fs::read_to_string(kmod_dir().join("dkms.conf")).expect("dkms.conf");
    let name = dkms_value(&conf, "PACKAGE_NAME");
    let version = dkms_value(&conf, "PACKAGE_VERSION");
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "dkms.conf's PACKAGE_VERSION is not the workspace's version"
    );
    assert!(
        Command::new("dkms").arg("--version").output().is_ok(),
        "dkms is missing (tests/run installs it)"
    );
    let kernels: Vec<String> = std::fs::read_dir("/lib/modules")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.path().join("build/Makefile").exists())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    if kernels.is_empty() {
        eprintln!("SKIP: dkms build: no kernel headers installed (/lib/modules/*/build)");
        return;
    }
    let scratch = TempDir::new("dkms");
    let source_tree = scratch.join("src");
    let dkms_tree = scratch.join("dkms");
    copy_sources(&kmod_dir(), &source_tree.join(format!("{name}-{version}")));
    std::fs::create_dir_all(&dkms_tree).expect("dkms tree");
    let trees = [
        "--sourcetree",
        &source_tree.display().to_string(),
        "--dkmstree",
        &dkms_tree.display().to_string(),
    ]
    .map(str::to_owned);
    let module = format!("{name}/{version}");
    let mut add = vec!["add", &module];
    add.extend(trees.iter().map(String::as_str));
    sh("dkms", &add);
    for kernel in &kernels {
        let mut build = vec!["build", &module, "-k", kernel];
        build.extend(trees.iter().map(String::as_str));
        let out = Command::new("dkms").args(&build).output().expect("dkms");
        let log = dkms_tree.join(format!("{name}/{version}/build/make.log"));
        assert!(
            out.status.success(),
            "dkms {build:?} failed ({}): {}{}\nmake.log: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let built = dkms_tree.join(format!("{name}/{version}/{kernel}"));
        let ko = walk(&built)
            .into_iter()
            .find(|path| {
                let file = path.file_name().unwrap_or_default().to_string_lossy();
                file == "fuse_blk.ko" || file.starts_with("fuse_blk.ko.")
            })
            .unwrap_or_else(|| panic!("no fuse_blk.ko under {}", built.display()));
        let vermagic = sh("modinfo", &["-F", "vermagic", &ko.display().to_string()]);
        assert!(
            vermagic.starts_with(&format!("{kernel} ")),
            "{}: vermagic {vermagic:?} for {kernel}",
            ko.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
