//! `fuse-blk`: attach, detach and list block devices served from userspace.

mod backend;
mod config;
mod daemon;
mod dm_user;
mod resize;
mod state;
mod stats;
mod systemd;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::state::DeviceState;

/// Block devices served by a userspace daemon over the FUSE protocol.
#[derive(Parser)]
#[command(name = "fuse-blk", version, about, propagate_version = true)]
struct Cli {
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn")]
    log_level: log::LevelFilter,

    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Create a block device served by BACKEND and print its path.
    Attach(AttachArgs),
    /// Flush and remove a device; its daemon exits.
    Detach {
        /// The device path (/dev/loopN, /dev/fuseblkN) or its name.
        device: String,
    },
    /// Replace the daemon of a device with a new one serving the same
    /// backend, without an I/O error. With the kernel module, the new daemon
    /// attaches to every queue and takes all new requests; the old one
    /// answers what it had taken and exits.
    ///
    /// On the stock path (loop + FUSE file) the old daemon passes its FUSE
    /// connection to the new one and stops reading; requests wait in the
    /// kernel meanwhile. This needs the old daemon alive: when a stock-path
    /// daemon dies, the stock kernel fails the device's I/O and nothing can
    /// recover it (the kernel module can: see `attach --recover`). A mem:
    /// backend cannot be handed over: its contents live in the old daemon.
    ///
    /// `--transport dm-user`: on dm-user's target, the new daemon opens the
    /// node, then the old one answers what it read and exits; on the bridge
    /// the daemon stays (it stands in for dm-user's target) and the
    /// handler's process serving the node is replaced by one running this
    /// program.
    Handoff {
        /// The device path or its name.
        device: String,
    },
    /// Change a device's size while it serves (online resize): the backend
    /// grows or shrinks (mem: and file: can) and the kernel sends a change
    /// uevent; then grow the file system on it (resize2fs, xfs_growfs).
    /// Shrinking a mounted device is refused.
    Resize {
        /// The device path or its name.
        device: String,
        /// The new size in bytes, or with a K, M, G or T suffix.
        size: String,
    },
    /// Show what each device's daemon has served, like iostat -x: requests
    /// and kilobytes per second by kind, requests in flight, service-time
    /// percentiles and errors; first since the daemon started, then over
    /// each --interval.
    Stats(stats::StatsArgs),
    /// Attach the device described in CONFIG_DIR/NAME.conf (backend and
    /// attach's options, `key = value` lines), or every one (--all).
    Up(config::UpArgs),
    /// Detach device NAME; refuses while it is mounted, saying where.
    Down(config::DownArgs),
    /// Show every attached device.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// The kernel module when /dev/fuse-blk opens (which loads it where it
    /// is installed), else the stock path.
    Auto,
    /// The fuse-blk kernel module (/dev/fuseblkN).
    Kmod,
    /// Stock kernel: a one-file FUSE filesystem with a loop device on top.
    Loop,
    /// The backend serves a dm-user node as a dm-user daemon: dm-user's own
    /// target made with dmsetup where the kernel has it (the device is
    /// /dev/mapper/NAME), else the dm-user bridge (CUSE) over a fuse-blk
    /// device.
    #[value(name = "dm-user")]
    DmUser,
}

/// How requests and replies cross between the kernel and the daemon.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Io {
    /// io_uring where the kernel offers it, else read/write.
    Auto,
    /// io_uring only: fail where the kernel does not offer it.
    Uring,
    /// One read(2) per request and one write(2) per reply.
    Rw,
}

impl From<Io> for fuse_blk::IoMode {
    fn from(io: Io) -> fuse_blk::IoMode {
        match io {
            Io::Auto => fuse_blk::IoMode::Auto,
            Io::Uring => fuse_blk::IoMode::Uring,
            Io::Rw => fuse_blk::IoMode::ReadWrite,
        }
    }
}

#[derive(Args)]
pub struct AttachArgs {
    /// How the device reaches the kernel.
    #[arg(long, value_enum, default_value = "auto")]
    transport: Transport,
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Logical block size in bytes.
    #[arg(long, default_value = "512", value_parser = parse_block_size)]
    block_size: u32,
    /// Name of the device (default: fuseblkN); `detach` and `list` use it.
    #[arg(long)]
    name: Option<String>,
    /// How requests reach the daemon: io_uring or read/write on the
    /// channel.
    #[arg(long, value_enum, default_value = "auto")]
    io: Io,
    /// Stay in the foreground instead of running the daemon in the
    /// background.
    #[arg(long)]
    foreground: bool,
    /// Stock path: worker threads (default: one per CPU, at least 2).
    #[arg(long)]
    threads: Option<usize>,
    /// Send the reads and writes of a file: backend through the daemon
    /// too, instead of letting the kernel read and write the file itself
    /// (the module's passthrough, or FUSE passthrough on the stock path,
    /// where the kernel offers it).
    #[arg(long)]
    no_passthrough: bool,
    /// io_uring: a queue's thread polls for the next request instead of
    /// sleeping while requests come at most this many microseconds apart
    /// on average (it spins for twice its average wait, at most four
    /// times this: CPU time for fewer wake-ups); 0 never polls.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = fuse_blk::DEFAULT_RING_POLL.as_micros() as u64)]
    ring_poll_us: u64,
    /// Kernel module: hardware queues, each served by a thread of its own
    /// (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: Option<u16>,
    /// Kernel module: requests in flight per queue (default 128).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    queue_depth: Option<u16>,
    /// Kernel module: how long requests wait for a new daemon (`attach
    /// --recover`) when the daemon dies; 0 fails them at once (default
    /// 30000).
    #[arg(long)]
    recovery_timeout_ms: Option<u32>,
    /// Kernel module: when the daemon dies, fail the requests it had taken
    /// instead of reissuing them to the next daemon (for backends that must
    /// not see a write twice).
    #[arg(long)]
    fail_inflight: bool,
    /// Serve the existing kernel-module device DEVICE|NAME, whose daemon
    /// died (or which `handoff` moves here), with BACKEND.
    #[arg(long, value_name = "DEVICE|NAME", conflicts_with_all = ["name", "read_only"])]
    recover: Option<String>,
    /// Kernel module: milliseconds before an unanswered request is
    /// interrupted, and as long again before it fails; also how long I/O
    /// waits for a daemon that is gone (default 30000).
    #[arg(long)]
    io_timeout_ms: Option<u32>,
    /// nbd: how long requests wait while the connection to the server is
    /// down (reconnecting with backoff, then reissued) before they fail
    /// with EIO; 0 fails them after one reconnection attempt (default
    /// 30000).
    #[arg(long, value_name = "MILLISECONDS")]
    reconnect_timeout_ms: Option<u32>,
    /// nbd: a command the server has not answered within this counts as a
    /// broken connection: it is reissued after reconnecting (as the
    /// kernel's nbd client's timeout does); also bounds a reconnection's
    /// handshake; 0: commands wait as long as the connection lasts
    /// (default 30000).
    #[arg(long, value_name = "MILLISECONDS")]
    command_timeout_ms: Option<u32>,
    /// rbd: the Ceph client's id (`admin` for client.admin, the default),
    /// as `rbd --id` takes it.
    #[arg(long, value_name = "NAME")]
    rbd_id: Option<String>,
    /// rbd: the Ceph configuration file (default: librados' search,
    /// $CEPH_CONF then /etc/ceph/ceph.conf).
    #[arg(long, value_name = "PATH")]
    rbd_conf: Option<std::path::PathBuf>,
    /// rbd: the keyring holding the client's key (default: what the
    /// configuration names).
    #[arg(long, value_name = "PATH")]
    rbd_keyring: Option<std::path::PathBuf>,
    /// qcow2: bytes of L2 tables kept in memory, for each image of the
    /// backing chain (K, M, G; default 4M, which maps 32 GiB of 64 KiB
    /// clusters; at least two tables are kept).
    #[arg(long, value_name = "SIZE", value_parser = parse_cache_size)]
    qcow2_l2_cache: Option<usize>,
    /// qcow2: bytes of refcount blocks kept in memory (default 1M).
    #[arg(long, value_name = "SIZE", value_parser = parse_cache_size)]
    qcow2_refcount_cache: Option<usize>,
    /// qcow2: store whole clusters compressed, as `qemu-img convert -c`
    /// does: a write covering a cluster (or the image's end) that is
    /// unallocated, zero or compressed is compressed with the image's
    /// compression type (deflate, or zstd) and kept so when that saves
    /// space; qemu reads the result. Partial writes, and writes into
    /// normal clusters, are stored as they are.
    #[arg(long)]
    qcow2_compress: bool,
    /// Internal: the descriptor on which a background daemon reports
    /// readiness to the `attach` that started it.
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
    /// Internal: serve BACKEND on this dm-user node as the child of a
    /// `--transport dm-user` daemon on the bridge.
    #[arg(long, hide = true, value_name = "NODE")]
    serve_dm_user_node: Option<std::path::PathBuf>,
    /// mem:SIZE (sparse memory), file:PATH (image file or block device),
    /// null:SIZE (reads zeros, drops writes), dm-user:NAME:SIZE (served by
    /// a dm-user daemon on /dev/dm-user/NAME), nbd://HOST[:PORT]/EXPORT or
    /// nbd+unix:///EXPORT?socket=PATH (an NBD server's export), qcow2:PATH
    /// (a qcow2 image, over its backing files), rbd:POOL/IMAGE (a Ceph
    /// RBD image, through librbd). SIZE takes K, M, G, T.
    backend: String,
}

impl AttachArgs {
    pub fn ring_poll(&self) -> Duration {
        Duration::from_micros(self.ring_poll_us)
    }

    pub fn ring_poll_us(&self) -> u64 {
        self.ring_poll_us
    }

    pub fn threads(&self) -> Option<usize> {
        self.threads
    }

    /// Whether this attach goes through the kernel module; `attach` has
    /// already refused `kmod` without the module.
    pub fn use_kmod(&self) -> bool {
        match self.transport {
            Transport::Kmod => true,
            Transport::Auto => fuse_blk_kmod::available(),
            Transport::Loop => false,
            // The bridge's device, where the bridge stands in.
            Transport::DmUser => fuse_blk_kmod::available(),
        }
    }

    /// Whether the backend serves a dm-user node (`--transport dm-user`).
    pub fn dm_user_transport(&self) -> bool {
        self.transport == Transport::DmUser
    }

    /// `--transport dm-user`: descriptors open on the node, each served by
    /// a thread of its own (`--queues`, default one per CPU).
    pub fn dm_user_descriptors(&self) -> u16 {
        self.queues
            .unwrap_or_else(|| u16::try_from(fuse_blk_attach::default_threads()).unwrap_or(2))
    }
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("{text} is not 512 or 4096")),
    }
}

fn parse_cache_size(text: &str) -> Result<usize, String> {
    let bytes = fuse_blk_backends::parse_size(text).map_err(|e| e.to_string())?;
    usize::try_from(bytes).map_err(|_| format!("{text} is too large"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .parse_default_env()
        .init();
    let result = match cli.command {
        Commands::Attach(args) => attach(args),
        Commands::Detach { device } => detach(&device),
        Commands::Handoff { device } => handoff(&device),
        Commands::Resize { device, size } => resize::run(&device, &size),
        Commands::List { json } => list(json),
        Commands::Stats(args) => stats::run(args),
        Commands::Up(args) => config::up(args),
        Commands::Down(args) => config::down(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("fuse-blk: {message}");
            ExitCode::FAILURE
        }
    }
}

fn attach(args: AttachArgs) -> Result<(), String> {
    let backend = Backend::parse(&args.backend, &args)?;
    if args.transport == Transport::DmUser {
        if backend.waits_for_a_daemon() {
            return Err(format!(
                "{backend}: --transport dm-user serves a backend on a dm-user node; a dm-user: backend is served by a daemon of its own"
            ));
        }
        if let Some(node) = &args.serve_dm_user_node {
            return dm_user::serve_as_child(
                node,
                &backend,
                args.read_only,
                args.block_size,
                args.dm_user_descriptors(),
            );
        }
    }
    if let Some(name) = &args.name {
        state::validate_name(name)?;
    }
    // A user may own module devices where the module allows it
    // (unprivileged devices); the other transports bind loop devices or
    // make device-mapper targets, which only root can.
    let module_chosen = match args.transport {
        Transport::Kmod => true,
        Transport::Auto => fuse_blk_kmod::available(),
        _ => false,
    };
    if !nix::unistd::geteuid().is_root() && !module_chosen {
        return Err("attach needs root: creating block devices takes CAP_SYS_ADMIN (a user may attach with the fuse_blk module, where it allows unprivileged devices)".into());
    }
    if args.transport == Transport::Kmod && !fuse_blk_kmod::available() {
        return Err(format!(
            "the kmod transport needs the fuse_blk kernel module ({} is missing)",
            fuse_blk_kmod::CONTROL_PATH
        ));
    }
    if let Some(fd) = args.ready_fd {
        // SAFETY: the parent `attach` passed this descriptor to us open and
        // owns no copy of it; nothing else in this process uses it.
        let pipe = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        return daemon::run(&args, &backend, daemon::Readiness::Pipe(pipe), true);
    }
    if args.foreground {
        return daemon::run(&args, &backend, daemon::Readiness::Stdout, false);
    }
    spawn_daemon(std::env::args_os().skip(1).collect())
}

/// Starts this same command again as a detached daemon and waits for it to
/// report the device ready (or why not).
fn spawn_daemon(args: Vec<std::ffi::OsString>) -> Result<(), String> {
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    const READY_FD: i32 = 3;
    let exe = std::env::current_exe().map_err(|e| format!("finding myself: {e}"))?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .arg(format!("--ready-fd={READY_FD}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let pipe_fd = write_end.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (setsid, dup2); the child gets its own session so that the terminal's
    // signals do not reach the daemon.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(pipe_fd, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"))?;
    drop(write_end);
    let mut line = String::new();
    let _ = BufReader::new(File::from(read_end)).read_line(&mut line);
    let line = line.trim_end();
    if let Some(device) = line.strip_prefix("ok ") {
        println!("{device}");
        return Ok(());
    }
    // The daemon undoes its own work before it reports an error; reap it.
    let status = child.wait().map_err(|e| e.to_string())?;
    match line.strip_prefix("error ") {
        Some(message) => Err(message.to_owned()),
        None => Err(format!(
            "the daemon exited ({status}) before the device was ready"
        )),
    }
}

fn handoff(target: &str) -> Result<(), String> {
    let (dir, record) = state::find(target)?;
    if record.backend.starts_with("dm-user:") {
        return Err(format!(
            "{}: a dm-user device's node lives in its daemon and cannot be handed over yet",
            record.name
        ));
    }
    if record.backend.starts_with("mem:") {
        return Err(format!(
            "{}: a mem: device's contents live in its daemon and cannot be handed over",
            record.name
        ));
    }
    if record.transport == dm_user::ON_BRIDGE {
        // The bridge stays; the child serving its node is replaced.
        return dm_user::hand_over(&dir, &record.name);
    }
    // A user hands over module devices of its own (the module checks).
    if !nix::unistd::geteuid().is_root() && record.dev_id.is_none() {
        return Err("handoff needs root".into());
    }
    systemd::check_handoff(&record.name, record.pid)?;
    // The successor serves as this daemon does: same io mode, polling
    // and threads.
    let mut args = vec![
        "attach".to_owned(),
        "--recover".to_owned(),
        record.name.clone(),
    ];
    if record.transport == dm_user::ON_TARGET {
        // The successor opens the target's node, then the old daemon
        // stops reading, answers what it read and exits.
        args.extend(["--transport".to_owned(), "dm-user".to_owned()]);
    }
    args.extend(record.serving_args());
    args.push(record.backend.clone());
    spawn_daemon(args.into_iter().map(Into::into).collect())?;
    wait_for_exit(&record, "the old daemon")
}

/// Waits up to 60 s for the daemon of `record` to exit.
fn wait_for_exit(record: &DeviceState, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while record.daemon_alive() {
        if Instant::now() > deadline {
            return Err(format!(
                "{what} (pid {}) did not exit within 60 s",
                record.pid
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn detach(target: &str) -> Result<(), String> {
    let (dir, record) = state::find(target)?;
    if !record.daemon_alive() {
        cleanup_dead(&dir, &record);
        eprintln!(
            "fuse-blk: the daemon of {} had died; removed what it left",
            record.name
        );
        return Ok(());
    }
    daemon::request_detach(&dir)?;
    // The daemon unmounts and removes its directory on its way out.
    wait_for_exit(&record, "the daemon")
}

/// Removes what a killed daemon left: its loop device (unbound once unused),
/// its dead FUSE mount and its directory.
fn cleanup_dead(dir: &state::DeviceDir, record: &DeviceState) {
    if record.transport == dm_user::ON_TARGET {
        dm_user::remove_left_target(&record.name);
    }
    if let Some(dev_id) = record.dev_id {
        match fuse_blk_kmod::Control::open().and_then(|control| control.destroy(dev_id)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => log::warn!("{e}"),
        }
    }
    let mountpoint = Path::new(&record.mountpoint);
    if let Some(loop_name) = Path::new(&record.device)
        .file_name()
        .and_then(|n| n.to_str())
    {
        let ours = fuse_blk_loop::loopdev::backing_file(loop_name)
            .is_some_and(|backing| Path::new(&backing).starts_with(mountpoint));
        if ours {
            if let Err(e) = fuse_blk_loop::loopdev::detach_path(Path::new(&record.device)) {
                log::warn!("{e}");
            }
        }
    }
    if !record.mountpoint.is_empty() && fuse_blk_loop::mount::is_mountpoint(mountpoint) {
        if let Err(e) = fuse_blk_loop::mount::unmount(mountpoint) {
            log::warn!("{e}");
        }
    }
    if let Err(e) = dir.remove() {
        log::warn!("removing {}: {e}", dir.path.display());
    }
}

/// The status of a device whose daemon is gone: a kernel-module device
/// lives on, its requests waiting for `attach --recover`.
fn orphan_status(record: &DeviceState) -> String {
    let info = record
        .dev_id
        .and_then(|id| fuse_blk_kmod::Control::open().and_then(|c| c.info(id)).ok());
    match info {
        Some(info) if info.state != fuse_blk_kmod::uapi::STATE_DEAD => {
            format!("orphaned ({} waiting)", info.waiting)
        }
        _ => "dead".into(),
    }
}

fn list(json: bool) -> Result<(), String> {
    let mut rows = Vec::new();
    for dir in state::all() {
        match dir.read() {
            Ok(record) => {
                let status = if !record.daemon_alive() {
                    orphan_status(&record)
                } else if record.device.is_empty() {
                    "starting".to_string()
                } else if let Some(connection) = daemon::request_status(&dir) {
                    // An NBD backend: whether its server is reachable.
                    format!("running, {connection}")
                } else {
                    "running".to_string()
                };
                rows.push((record, status));
            }
            Err(e) => log::warn!("{}: {e}", dir.path.display()),
        }
    }
    if json {
        let array: Vec<serde_json::Value> = rows
            .iter()
            .map(|(record, status)| {
                let mut value = serde_json::to_value(record).expect("state serialises");
                value["status"] = status.as_str().into();
                value
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&array).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    println!(
        "{:<16} {:<14} {:<14} {:<28} {:>14} {:>8}  STATUS",
        "NAME", "DEVICE", "TRANSPORT", "BACKEND", "SIZE", "PID"
    );
    for (record, status) in rows {
        // "+pt": the kernel reads and writes the backing file itself.
        let transport = if record.passthrough {
            format!("{}+pt", record.transport)
        } else {
            record.transport.clone()
        };
        println!(
            "{:<16} {:<14} {:<14} {:<28} {:>14} {:>8}  {status}",
            record.name, record.device, transport, record.backend, record.size, record.pid
        );
    }
    Ok(())
}
