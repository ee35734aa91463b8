//! Devices described in files: `/etc/fuse-blk/NAME.conf` holds what
//! `fuse-blk attach` would be given for the device NAME, and `fuse-blk up`
//! attaches it, `down` detaches it (what `fuse-blk@NAME.service` runs).
//!
//! The format, one setting per line:
//!
//! ```text
//! # comments and blank lines are ignored
//! backend = file:/var/lib/images/data.img
//! block-size = 4096
//! read-only = no
//! ```
//!
//! `backend` is `attach`'s BACKEND; every other key is one of `attach`'s
//! long options without its dashes, with its value (`yes` or `no` for an
//! option that takes none). The device's name is the file's, so `name`
//! (and `foreground`, `recover`) cannot be set. Values are taken as
//! written, spaces inside them included; nothing is quoted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{ArgAction, Args, CommandFactory, Parser};

use crate::state;
use crate::{Cli, Commands};

/// Where `up` looks for `NAME.conf` unless told otherwise.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/fuse-blk";

/// `attach` options a file cannot set: the name is the file's, and how
/// the daemon runs is `up`'s business.
const NOT_IN_A_FILE: [&str; 3] = ["name", "foreground", "recover"];

#[derive(Args)]
pub struct UpArgs {
    /// Every device described in the configuration directory (those
    /// attached already are left as they are).
    #[arg(long, conflicts_with_all = ["name", "foreground"], required_unless_present = "name")]
    all: bool,
    /// Serve the device from this process instead of a daemon in the
    /// background (what fuse-blk@NAME.service runs: under that unit it
    /// tells systemd when the device exists).
    #[arg(long)]
    foreground: bool,
    /// Where the NAME.conf files are.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_CONFIG_DIR)]
    config_dir: PathBuf,
    /// The device to attach: DIR/NAME.conf describes it.
    name: Option<String>,
}

#[derive(Args)]
pub struct DownArgs {
    /// The device to detach (its name, as in NAME.conf).
    name: String,
}

/// A device's file, read and checked: the arguments of the `attach`
/// that makes the device.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// `attach`'s arguments after `attach`, BACKEND last.
    pub attach_args: Vec<String>,
}

/// The file describing device `name` in `dir`.
pub fn config_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.conf"))
}

/// Reads and checks `dir/NAME.conf`.
pub fn load(dir: &Path, name: &str) -> Result<DeviceConfig, String> {
    state::validate_name(name)?;
    let path = config_path(dir, name);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&path, name, &text)
}

/// Parses the text of a device's file; `path` is only for messages.
pub fn parse(path: &Path, name: &str, text: &str) -> Result<DeviceConfig, String> {
    let file = path.display();
    let attach = Cli::command();
    let attach = attach
        .find_subcommand("attach")
        .expect("attach is a subcommand");
    let mut backend = None;
    let mut options: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!(
                "{file}:{number}: expected `key = value`, found {line:?}"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(format!("{file}:{number}: {key} has no value"));
        }
        if key == "backend" {
            if backend.is_some() {
                return Err(format!("{file}:{number}: backend is set twice"));
            }
            backend = Some(value.to_owned());
            continue;
        }
        let known = attach.get_arguments().find(|arg| {
            arg.get_long() == Some(key) && !arg.is_hide_set() && !NOT_IN_A_FILE.contains(&key)
        });
        let Some(arg) = known else {
            return Err(format!(
                "{file}:{number}: unknown key {key:?} (the keys are backend and attach's long options, e.g. block-size)"
            ));
        };
        let option_args = if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                "yes" | "true" | "1" => vec![format!("--{key}")],
                "no" | "false" | "0" => Vec::new(),
                _ => {
                    return Err(format!(
                        "{file}:{number}: {key} takes yes or no, not {value:?}"
                    ))
                }
            }
        } else {
            vec![format!("--{key}={value}")]
        };
        // The option alone, with a backend that parses: its value is
        // checked as `attach` checks it.
        let mut alone = vec!["fuse-blk".to_owned(), "attach".to_owned()];
        alone.extend(option_args.iter().cloned());
        alone.push("null:1M".to_owned());
        if let Err(e) = Cli::try_parse_from(&alone) {
            return Err(format!("{file}:{number}: {key}: {}", clap_message(&e)));
        }
        if options
            .insert(key.to_owned(), (number, option_args))
            .is_some()
        {
            return Err(format!("{file}:{number}: {key} is set twice"));
        }
    }
    let Some(backend) = backend else {
        return Err(format!(
            "{file}: no backend (a line such as `backend = file:/path/to/image`)"
        ));
    };
    let mut attach_args = vec!["--name".to_owned(), name.to_owned()];
    for (_, option_args) in options.into_values() {
        attach_args.extend(option_args);
    }
    attach_args.push(backend);
    // The whole: options that exclude each other, and the backend as
    // `attach` reads it.
    let cli = Cli::try_parse_from(attach_argv(&attach_args))
        .map_err(|e| format!("{file}: {}", clap_message(&e)))?;
    let Commands::Attach(args) = cli.command else {
        unreachable!("parsed as attach");
    };
    crate::backend::Backend::parse(&args.backend, &args)
        .map_err(|e| format!("{file}: backend: {e}"))?;
    Ok(DeviceConfig { attach_args })
}

/// The command line of `fuse-blk attach` with `args`.
fn attach_argv(args: &[String]) -> Vec<String> {
    let mut argv = vec!["fuse-blk".to_owned(), "attach".to_owned()];
    argv.extend(args.iter().cloned());
    argv
}

/// Clap's message about a command line, in one line: its first, without
/// the `error: ` clap starts it with.
fn clap_message(error: &clap::Error) -> String {
    let text = error.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// `fuse-blk up`.
pub fn up(args: UpArgs) -> Result<(), String> {
    if args.all {
        return up_all(&args.config_dir);
    }
    let name = args
        .name
        .as_deref()
        .expect("clap requires NAME without --all");
    let config = load(&args.config_dir, name)?;
    if args.foreground {
        // This process becomes `attach --foreground` (same pid: systemd's
        // main process), whose command line its helpers read again (the
        // dm-user transport starts this program with it).
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().map_err(|e| format!("finding myself: {e}"))?;
        let error = std::process::Command::new(exe)
            .arg("attach")
            .arg("--foreground")
            .args(&config.attach_args)
            .exec();
        return Err(format!("running attach: {error}"));
    }
    let mut argv = vec!["attach".to_owned()];
    argv.extend(config.attach_args);
    crate::spawn_daemon(argv.into_iter().map(Into::into).collect())
}

/// `up --all`: each NAME.conf of `dir` in name order; a device that
/// fails does not keep the others down.
fn up_all(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|entry| {
            let file_name = entry.file_name().into_string().ok()?;
            Some(file_name.strip_suffix(".conf")?.to_owned())
        })
        .collect();
    names.sort();
    let mut failed = 0;
    for name in &names {
        let result = match state::find(name) {
            Ok((_, record)) if record.daemon_alive() => {
                eprintln!(
                    "fuse-blk: {name}: already attached ({}), left as it is",
                    record.device
                );
                Ok(())
            }
            _ => load(dir, name).and_then(|config| {
                let mut argv = vec!["attach".to_owned()];
                argv.extend(config.attach_args);
                crate::spawn_daemon(argv.into_iter().map(Into::into).collect())
            }),
        };
        if let Err(message) = result {
            eprintln!("fuse-blk: {name}: {message}");
            failed += 1;
        }
    }
    match failed {
        0 => Ok(()),
        _ => Err(format!(
            "{failed} of {} devices in {} did not come up",
            names.len(),
            dir.display()
        )),
    }
}

/// `fuse-blk down`: `detach`, saying where the device is mounted when
/// that is why it refuses.
pub fn down(args: DownArgs) -> Result<(), String> {
    state::validate_name(&args.name)?;
    let (_, record) = state::find(&args.name)?;
    crate::detach(&args.name).map_err(|message| match mounted_on(Path::new(&record.device)) {
        Some(mountpoint) => format!(
            "{}: {} is mounted on {mountpoint}: unmount it first (the device stays attached)",
            args.name, record.device
        ),
        None => format!("{}: {message}", args.name),
    })
}

/// Where `device` or one of its partitions is mounted, as this process's
/// mount namespace sees it (major and minor numbers in mountinfo).
fn mounted_on(device: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device).ok()?.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let name = device.file_name()?.to_str()?;
    // The partitions' numbers: /sys/block/NAME/NAMEpN/dev.
    let mut numbers = vec![format!("{major}:{minor}")];
    if let Ok(entries) = std::fs::read_dir(format!("/sys/block/{name}")) {
        for entry in entries.flatten() {
            if let Ok(dev) = std::fs::read_to_string(entry.path().join("dev")) {
                if entry.file_name().to_string_lossy().starts_with(name) {
                    numbers.push(dev.trim().to_owned());
                }
            }
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let number = fields.nth(2)?;
        let mountpoint = fields.nth(1)?;
        numbers
            .iter()
            .any(|n| n == number)
            .then(|| mountpoint.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Vec<String>, String> {
        parse(Path::new("/etc/fuse-blk/data.conf"), "data", text).map(|c| c.attach_args)
    }

    #[test]
    fn keys_become_attach_options() {
        let args = parsed(
            "# a device\n\nbackend = mem:64M\nblock-size = 4096\n  read-only = yes\nno-passthrough = no\nqueues=2\n",
        )
        .expect("parses");
        assert_eq!(
            args,
            [
                "--name",
                "data",
                "--block-size=4096",
                "--queues=2",
                "--read-only",
                "mem:64M"
            ]
        );
    }

    #[test]
    fn qcow2_options_in_a_file() {
        let args = parsed(
            "backend = qcow2:/var/lib/images/vm.qcow2\nqcow2-compress = yes\nqcow2-l2-cache = 8M\n",
        )
        .expect("parses");
        assert_eq!(
            args,
            [
                "--name",
                "data",
                "--qcow2-compress",
                "--qcow2-l2-cache=8M",
                "qcow2:/var/lib/images/vm.qcow2"
            ]
        );
    }

    #[test]
    fn bad_files_are_refused_in_one_line_naming_file_and_line() {
        for (text, expected) in [
            (
                "backend = mem:1M\nblok-size = 4096\n",
                "/etc/fuse-blk/data.conf:2: unknown key \"blok-size\"",
            ),
            ("block-size = 4096\n", "/etc/fuse-blk/data.conf: no backend"),
            (
                "backend = mem:1M\n\nblock-size = 1000\n",
                "/etc/fuse-blk/data.conf:3: block-size: invalid value '1000'",
            ),
            (
                "backend = mem:1M\nread-only = maybe\n",
                "/etc/fuse-blk/data.conf:2: read-only takes yes or no",
            ),
            (
                "backend = mem:1M\nqueues = 0\n",
                "/etc/fuse-blk/data.conf:2: queues: invalid value '0'",
            ),
            (
                "backend = mem:1M\nname = other\n",
                "/etc/fuse-blk/data.conf:2: unknown key \"name\"",
            ),
            (
                "backend = mem:1M\nready-fd = 3\n",
                "/etc/fuse-blk/data.conf:2: unknown key \"ready-fd\"",
            ),
            (
                "backend = mem:1M\nbackend = mem:2M\n",
                "/etc/fuse-blk/data.conf:2: backend is set twice",
            ),
            (
                "backend = mem:1M\nqueues = 2\nqueues = 3\n",
                "/etc/fuse-blk/data.conf:3: queues is set twice",
            ),
            (
                "backend mem:1M\n",
                "/etc/fuse-blk/data.conf:1: expected `key = value`",
            ),
            (
                "backend =\n",
                "/etc/fuse-blk/data.conf:1: backend has no value",
            ),
            ("backend = mem:lots\n", "/etc/fuse-blk/data.conf: backend: "),
        ] {
            let message = parsed(text).expect_err(text);
            assert!(
                message.starts_with(expected),
                "{text:?}: {message:?} does not start with {expected:?}"
            );
            assert!(!message.contains('\n'), "one line: {message:?}");
        }
    }
}
