//! The daemon behind one device: sets it up, reports readiness, serves
//! until it is detached (control socket or SIGTERM), and removes every trace
//! of itself on the way out.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_blk_attach::{AttachOptions, AttachedDevice, Detacher, Ended, Resizer, Transport};
use fuse_blk_kmod::KmodDevice;
use fuse_blk_loop::StockDevice;
use nix::sys::signal::{SigSet, Signal};

use crate::backend::{self, Backend};
use crate::dm_user;
use crate::state::{self, DeviceDir, DeviceState};
use crate::AttachArgs;

/// Where the daemon says it is ready (or why it is not): stdout in the
/// foreground, a pipe to the waiting `attach` otherwise.
pub enum Readiness {
    Stdout,
    Pipe(File),
}

impl Readiness {
    fn ready(self, device: &str) {
        match self {
            Readiness::Stdout => {
                println!("{device}");
                let _ = std::io::stdout().flush();
            }
            Readiness::Pipe(mut pipe) => {
                let _ = writeln!(pipe, "ok {device}");
            }
        }
    }

    fn failed(self, message: &str) {
        if let Readiness::Pipe(mut pipe) = self {
            let _ = writeln!(pipe, "error {message}");
        }
    }
}

/// Runs the daemon; returns a one-line error if the device could not be
/// attached (nothing is left behind then).
pub fn run(
    args: &AttachArgs,
    backend: &Backend,
    readiness: Readiness,
    detached: bool,
) -> Result<(), String> {
    let attached = match &args.recover {
        Some(target) => recover(backend, target, detached, args).map(|a| (a, true)),
        None => attach(args, backend, detached).map(|a| (a, false)),
    };
    match attached {
        Ok(((served, dir, state), recovered)) => serve(served, dir, state, readiness, recovered),
        Err(e) => {
            readiness.failed(&e);
            Err(e)
        }
    }
}

/// Signals that detach the device, blocked in every thread so that only the
/// signal thread receives them.
fn detach_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// What this daemon serves.
enum Served {
    /// A fuse-blk device: the module's, or the stock path's.
    Device(AttachedDevice),
    /// A handler on a dm-user node (`--transport dm-user`).
    DmUser(dm_user::Serving),
}

impl Served {
    fn detacher(&self) -> std::io::Result<DetachHandle> {
        Ok(match self {
            Served::Device(device) => DetachHandle::Device(device.detacher()?),
            Served::DmUser(serving) => DetachHandle::DmUser(serving.detacher()?),
        })
    }

    /// What resizes the device; None on a dm-user node, whose size is the
    /// target's.
    fn resizer(&self) -> std::io::Result<Option<Resizer>> {
        match self {
            Served::Device(device) => device.resizer().map(Some),
            Served::DmUser(_) => Ok(None),
        }
    }

    fn wait(self) -> std::io::Result<Ended> {
        match self {
            Served::Device(device) => device.wait(),
            Served::DmUser(serving) => serving.wait(),
        }
    }

    /// Tears down what this process made, when it cannot go on serving.
    fn abandon(self) {
        match self {
            Served::Device(device) => drop(device),
            Served::DmUser(serving) => serving.abandon(),
        }
    }
}

/// Detaches what this daemon serves, from the signal and control threads.
#[derive(Clone)]
enum DetachHandle {
    Device(Detacher),
    DmUser(dm_user::Detacher),
}

impl DetachHandle {
    fn detach(&self) -> std::io::Result<()> {
        match self {
            DetachHandle::Device(detacher) => detacher.detach(),
            DetachHandle::DmUser(detacher) => detacher.detach(),
        }
    }

    fn detach_when_unused(&self) -> std::io::Result<()> {
        match self {
            DetachHandle::Device(detacher) => detacher.detach_when_unused(),
            DetachHandle::DmUser(detacher) => detacher.detach_when_unused(),
        }
    }

    /// The stock path's handle, which hands a device over.
    fn stock(&self) -> Option<&fuse_blk_loop::Detacher> {
        match self {
            DetachHandle::Device(detacher) => detacher.stock(),
            DetachHandle::DmUser(_) => None,
        }
    }
}

fn attach(
    args: &AttachArgs,
    backend: &Backend,
    detached: bool,
) -> Result<(Served, DeviceDir, DeviceState), String> {
    // Before any thread exists, so that every thread inherits the mask.
    detach_signals()
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;

    let (name, dir) = match &args.name.clone().or_else(|| backend.default_name()) {
        Some(name) => {
            state::validate_name(name)?;
            match state::reserve(name)
                .map_err(|e| format!("{}: {e}", state::runtime_dir().display()))?
            {
                Some(dir) => (name.clone(), dir),
                None => return Err(format!("a device named {name} is already attached")),
            }
        }
        None => state::reserve_default()
            .map_err(|e| format!("{}: {e}", state::runtime_dir().display()))?,
    };
    let undo = |e: String| {
        backend::finish();
        let _ = dir.remove();
        e
    };
    if detached {
        redirect_stderr(&dir).map_err(undo)?;
    }

    let device = backend
        .open(args.read_only, args.block_size)
        .map_err(|e| e.to_string())
        .map_err(undo)?;
    let geometry = device.geometry();
    let kmod = args.use_kmod();
    let mut record = DeviceState {
        name: name.clone(),
        device: String::new(),
        transport: if kmod { "kmod" } else { "loop" }.into(),
        backend: backend.to_string(),
        size: geometry.size,
        block_size: geometry.logical_block_size,
        read_only: geometry.read_only,
        pid: std::process::id(),
        start_time: state::process_start_time(std::process::id()),
        mountpoint: if kmod {
            String::new()
        } else {
            dir.mountpoint().display().to_string()
        },
        dev_id: None,
        passthrough: false,
        io: None,
        ring_poll_us: None,
        threads: None,
        reconnect_timeout_ms: None,
        command_timeout_ms: None,
        rbd_id: None,
        rbd_conf: None,
        rbd_keyring: None,
        qcow2_l2_cache: None,
        qcow2_refcount_cache: None,
        qcow2_compress: false,
    };
    dir.write(&record)
        .map_err(|e| format!("writing state: {e}"))
        .map_err(undo)?;

    let mut options = AttachOptions::new(&name);
    options.transport = if kmod {
        Transport::Kmod
    } else {
        Transport::Loop
    };
    options.io = args.io.into();
    options.passthrough = !args.no_passthrough;
    options.ring_poll = args.ring_poll();
    options.threads = Some(stock_threads(args));
    options.mountpoint = Some(dir.mountpoint());
    options.queues = args.queues;
    options.queue_depth = args.queue_depth;
    options.io_timeout_ms = args.io_timeout_ms;
    options.recovery_timeout_ms = Some(args.recovery_timeout_ms.unwrap_or(30_000));
    options.fail_inflight = args.fail_inflight;
    options.scan_partitions = !backend.waits_for_a_daemon();
    if args.dm_user_transport() {
        let setup = dm_user::Setup {
            name: &name,
            descriptors: args.dm_user_descriptors(),
            bridge_device: options,
            bridge_policy: fuse_blk_dm_user::Policy {
                fail_inflight: args.fail_inflight,
                no_daemon_timeout: Duration::from_millis(
                    args.recovery_timeout_ms.unwrap_or(30_000).into(),
                ),
            },
            attach_args: std::env::args_os().skip(1).collect(),
            contents_in_process: backend.to_string().starts_with("mem:"),
        };
        let serving = dm_user::start(device, setup).map_err(undo)?;
        record.transport = serving.transport().into();
        record.device = serving.device_path().display().to_string();
        match serving.bridge_device() {
            Some(bridge) => record.dev_id = bridge.dev_id(),
            None => record.mountpoint = String::new(),
        }
        log::info!("{name}: {} serves {}", record.device, record.backend);
        return Ok((Served::DmUser(serving), dir, record));
    }
    let served = fuse_blk_attach::attach(device, &options)
        .map_err(|e| e.to_string())
        .map_err(undo)?;
    record.dev_id = served.dev_id();
    record.device = served.device_path().display().to_string();
    record.passthrough = served.passthrough();
    record_serving(&mut record, &served, args);
    log::info!("{name}: {} serves {}", record.device, record.backend);
    Ok((Served::Device(served), dir, record))
}

/// Serves an existing kernel-module device: one whose daemon died, or one
/// `handoff` moves to this process. Its directory and name stay; the state
/// gets this process's pid. Errors leave the device and its state as they
/// were.
fn recover(
    backend: &Backend,
    target: &str,
    detached: bool,
    args: &AttachArgs,
) -> Result<(Served, DeviceDir, DeviceState), String> {
    if detached {
        // Before any thread exists.
        crate::systemd::leave_handoff(target);
    }
    detach_signals()
        .thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    let (dir, mut record) = state::find(target)?;
    if record.transport == dm_user::ON_BRIDGE {
        return Err(format!(
            "{}: a device on the dm-user bridge cannot be recovered by another daemon (fuse-blk handoff replaces the process serving its node)",
            record.name
        ));
    }
    if args.dm_user_transport() != (record.transport == dm_user::ON_TARGET) {
        return Err(format!(
            "{}: --transport dm-user recovers a device on dm-user's target, and only it",
            record.name
        ));
    }
    if detached {
        redirect_stderr(&dir)?;
    }
    if record.transport == dm_user::ON_TARGET {
        let device = backend
            .open(record.read_only, record.block_size)
            .map_err(|e| e.to_string())?;
        let serving = dm_user::take_over(&record.name, device, args.dm_user_descriptors())?;
        // This daemon reads the node already: the old one, if alive,
        // answers what it read and exits.
        if record.daemon_alive() {
            if let Err(e) = request(&dir, dm_user::RETIRE) {
                serving.abandon();
                return Err(format!("{}: stopping the old daemon: {e}", record.name));
            }
        }
        record.pid = std::process::id();
        record.start_time = state::process_start_time(record.pid);
        record.backend = backend.to_string();
        log::info!(
            "{}: {} recovered by pid {}",
            record.name,
            record.device,
            record.pid
        );
        return Ok((Served::DmUser(serving), dir, record));
    }
    let device = backend
        .open(record.read_only, record.block_size)
        .map_err(|e| e.to_string())?;
    // Under fuse-blk@NAME.service, systemd must follow this process before
    // the old daemon, once displaced, exits; given back if this fails.
    let main_pid = crate::systemd::MainPid::take(&record.name, record.pid);
    let served = match record.dev_id {
        Some(dev_id) => AttachedDevice::from(
            KmodDevice::resume(device, dev_id, args.io.into(), args.ring_poll())
                .map_err(|e| e.to_string())?,
        ),
        None => {
            // The stock kernel ends a FUSE connection with its last
            // descriptor: only a live daemon can pass it on.
            if !record.daemon_alive() {
                return Err(format!(
                    "{}: the daemon is gone, and on the stock path its FUSE connection went with it",
                    record.name
                ));
            }
            let handover = receive_handover(&dir)?;
            let stock = StockDevice::resume(
                device,
                handover,
                Path::new(&record.device),
                Path::new(&record.mountpoint),
                stock_threads(args),
            )
            .map_err(|e| e.to_string())?;
            AttachedDevice::from(stock)
        }
    };
    main_pid.keep();
    record.pid = std::process::id();
    record.start_time = state::process_start_time(record.pid);
    record.backend = backend.to_string();
    record.passthrough = served.passthrough();
    record_serving(&mut record, &served, args);
    log::info!(
        "{}: {} recovered by pid {}",
        record.name,
        record.device,
        record.pid
    );
    Ok((Served::Device(served), dir, record))
}

/// Notes how this daemon serves, for `handoff` to start its successor so.
fn record_serving(record: &mut DeviceState, served: &AttachedDevice, args: &AttachArgs) {
    record.io = Some(if served.io_uring() { "uring" } else { "rw" }.into());
    record.ring_poll_us = Some(args.ring_poll_us());
    record.threads = match served.transport() {
        Transport::Kmod => None,
        _ => Some(stock_threads(args)),
    };
    record.reconnect_timeout_ms = args.reconnect_timeout_ms;
    record.command_timeout_ms = args.command_timeout_ms;
    // Absolute: the successor need not start where this one did.
    let absolute = |path: &Option<std::path::PathBuf>| {
        path.as_ref()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
    };
    record.rbd_id = args.rbd_id.clone();
    record.rbd_conf = absolute(&args.rbd_conf);
    record.rbd_keyring = absolute(&args.rbd_keyring);
    record.qcow2_l2_cache = args.qcow2_l2_cache;
    record.qcow2_refcount_cache = args.qcow2_refcount_cache;
    record.qcow2_compress = args.qcow2_compress;
}

/// The stock path's worker threads: `--threads`, or one per CPU.
fn stock_threads(args: &AttachArgs) -> usize {
    args.threads()
        .unwrap_or_else(fuse_blk_attach::default_threads)
}

/// A daemon in the background logs to a file in its directory.
fn redirect_stderr(dir: &DeviceDir) -> Result<(), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.log_file())
        .map_err(|e| format!("{}: {e}", dir.log_file().display()))?;
    // SAFETY: dup2 on two valid descriptors; replacing fd 2 affects only
    // where this process's diagnostics go.
    if unsafe { libc::dup2(log.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(format!(
            "redirecting the log: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn serve(
    served: Served,
    dir: DeviceDir,
    record: DeviceState,
    readiness: Readiness,
    recovered: bool,
) -> Result<(), String> {
    serve_with(served, dir, record, readiness, recovered, &spawn_thread)
}

/// Starts a named thread; a seam for tests, which make it fail.
type Spawn = dyn Fn(&'static str, Box<dyn FnOnce() + Send>) -> std::io::Result<()>;

fn spawn_thread(name: &'static str, body: Box<dyn FnOnce() + Send>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
}

/// [`serve`] with the threads started by `spawn`.
fn serve_with(
    served: Served,
    dir: DeviceDir,
    record: DeviceState,
    readiness: Readiness,
    recovered: bool,
    spawn: &Spawn,
) -> Result<(), String> {
    // Held while a control command runs, so that the daemon does not exit
    // between detaching and telling the client so.
    let answering = Arc::new(Mutex::new(()));
    if let Err(message) = start_serving(&served, &dir, &record, &answering, spawn) {
        // A device this process created is not in use yet: dropping it
        // removes it. A recovered one stays for the next daemon, with the
        // state its previous daemon left.
        served.abandon();
        backend::finish();
        if !recovered {
            let _ = dir.remove();
        }
        readiness.failed(&message);
        return Err(message);
    }
    readiness.ready(&record.device);
    crate::systemd::ready(&record.name, &record.device);

    let result = served.wait();
    backend::finish();
    drop(answering.lock());
    match result {
        Ok(Ended::HandedOver) => log::info!("{}: handed over to another daemon", record.name),
        _ => {
            log::info!("{}: detached", record.name);
            if let Err(e) = dir.remove() {
                log::warn!("removing {}: {e}", dir.path.display());
            }
        }
    }
    result.map(drop).map_err(|e| e.to_string())
}

/// Starts the signal and control threads and then publishes this daemon:
/// its state and its control socket. Nothing is published unless all of
/// it works, so that on an error the device's directory still names the
/// daemon it named before.
fn start_serving(
    served: &Served,
    dir: &DeviceDir,
    record: &DeviceState,
    answering: &Arc<Mutex<()>>,
    spawn: &Spawn,
) -> Result<(), String> {
    let detacher = served.detacher().map_err(|e| e.to_string())?;
    let control = Controls {
        detacher: detacher.clone(),
        resizer: served.resizer().map_err(|e| e.to_string())?,
        dir: dir.clone(),
    };
    let (socket, listener) = ControlSocket::bind(dir)?;
    spawn("signals", Box::new(move || signal_loop(detacher)))
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    let answering = answering.clone();
    spawn(
        "control",
        Box::new(move || control_loop(listener, control, answering)),
    )
    .map_err(|e| format!("starting the control thread: {e}"))?;
    socket.publish(dir, record)
}

/// This daemon's control socket, bound at a path of its own until
/// [`ControlSocket::publish`] moves it to the device's: two daemons taking
/// a device over at once each bind their own, and the one that publishes
/// last is the device's daemon.
struct ControlSocket {
    path: PathBuf,
    published: bool,
}

impl ControlSocket {
    fn bind(dir: &DeviceDir) -> Result<(ControlSocket, UnixListener), String> {
        let path = dir
            .path
            .join(format!("control.{}.sock", std::process::id()));
        // Left by a daemon of the same pid that did not get to publish.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((
            ControlSocket {
                path,
                published: false,
            },
            listener,
        ))
    }

    /// Writes the state and puts the socket in place, under the device
    /// directory's lock so that state and socket name the same daemon.
    fn publish(mut self, dir: &DeviceDir, record: &DeviceState) -> Result<(), String> {
        let _lock = dir
            .lock()
            .map_err(|e| format!("locking {}: {e}", dir.path.display()))?;
        dir.write(record)
            .map_err(|e| format!("writing state: {e}"))?;
        std::fs::rename(&self.path, dir.control_socket())
            .map_err(|e| format!("{}: {e}", dir.control_socket().display()))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Detaches the device on SIGTERM, SIGINT or SIGHUP, once it is no longer
/// in use.
fn signal_loop(detacher: DetachHandle) {
    loop {
        let Ok(signal) = detach_signals().wait() else {
            continue;
        };
        log::info!("{signal}: detaching once the device is no longer in use");
        crate::systemd::status("detaching once the device is no longer in use (unmount it)");
        match detacher.detach_when_unused() {
            Ok(()) => return,
            Err(e) => log::error!("detach: {e}"),
        }
    }
}

/// The control socket takes one command per connection, a line of text, and
/// answers `ok` or `error MESSAGE`; `status` is answered `ok` followed by
/// the connection state of an NBD backend, if it is one.
fn control_loop(listener: UnixListener, control: Controls, answering: Arc<Mutex<()>>) {
    for stream in listener.incoming().flatten() {
        let _answering = answering.lock();
        if let Err(e) = handle_control(stream, &control) {
            log::warn!("control connection: {e}");
        }
    }
}

/// What the control thread acts on.
struct Controls {
    detacher: DetachHandle,
    resizer: Option<Resizer>,
    dir: DeviceDir,
}

fn handle_control(stream: UnixStream, control: &Controls) -> std::io::Result<()> {
    let detacher = &control.detacher;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    // Each answer is one write: the peer reads it with one recvmsg.
    let answer = |text: String| (&stream).write_all(format!("{text}\n").as_bytes());
    let line = line.trim();
    if let Some(size) = line
        .strip_prefix(crate::resize::COMMAND)
        .and_then(|rest| rest.strip_prefix(' '))
    {
        return answer(crate::resize::answer(
            size,
            control.resizer.as_ref(),
            &control.dir,
        ));
    }
    if line == dm_user::RETIRE {
        return answer(match detacher {
            DetachHandle::DmUser(dm_user) => match dm_user.retire() {
                Ok(()) => "ok".into(),
                Err(e) => format!("error {e}"),
            },
            DetachHandle::Device(_) => "error not a device on a dm-user node".into(),
        });
    }
    if let Some(exe) = line
        .strip_prefix(dm_user::HANDOFF_CHILD)
        .and_then(|rest| rest.strip_prefix(' '))
    {
        return answer(match detacher {
            DetachHandle::DmUser(dm_user) => match dm_user.hand_over_child(Path::new(exe)) {
                Ok(()) => "ok".into(),
                Err(e) => format!("error {e}"),
            },
            DetachHandle::Device(_) => "error not a device on a dm-user node".into(),
        });
    }
    match line {
        "detach" => match detacher.detach() {
            Ok(()) => answer("ok".into()),
            Err(e) => answer(format!("error {e}")),
        },
        "handoff" => match detacher.stock() {
            Some(stock) => {
                let handover = match stock.hand_over() {
                    Ok(handover) => handover,
                    Err(e) => return answer(format!("error {e}")),
                };
                let mut text = format!("ok {}", handover.open_files);
                if let Some(id) = handover.backing_id {
                    text.push_str(&format!(" backing {id}"));
                }
                text.push('\n');
                send_with_fd(&stream, text.as_bytes(), &handover.fuse_fd)?;
                // The successor serves from now on; this daemon drains.
                stock.retire();
                Ok(())
            }
            None if matches!(detacher, DetachHandle::DmUser(_)) => {
                answer("error a device on a dm-user node cannot be handed over yet".into())
            }
            None => answer("error kernel-module devices are taken over through the module".into()),
        },
        "status" => match backend::connection_status() {
            Some(status) => answer(format!("ok {status}")),
            None => answer("ok".into()),
        },
        "stats" => answer(crate::stats::control_answer()),
        other => answer(format!("error unknown command {other:?}")),
    }
}

/// Sends `bytes` with a descriptor attached (SCM_RIGHTS).
fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    fd: &std::os::fd::OwnedFd,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(bytes)];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Asks the running daemon of a stock-path device for its FUSE connection.
fn receive_handover(dir: &DeviceDir) -> Result<fuse_blk_loop::Handover, String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{FromRawFd, OwnedFd};
    let stream = UnixStream::connect(dir.control_socket())
        .map_err(|e| format!("{}: {e}", dir.control_socket().display()))?;
    (&stream)
        .write_all(b"handoff\n")
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receiving the FUSE connection: {e}"))?;
    let mut fuse_fd = None;
    for cmsg in msg.cmsgs().map_err(|e| e.to_string())? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                fuse_fd.get_or_insert(owned);
            }
        }
    }
    let len = msg.bytes;
    let text = String::from_utf8_lossy(&buf[..len]).trim_end().to_owned();
    let Some(fields) = text.strip_prefix("ok ") else {
        return Err(text.strip_prefix("error ").unwrap_or(&text).to_owned());
    };
    let unexpected = || format!("unexpected answer from the daemon: {text:?}");
    // "ok OPEN_FILES [backing ID]"
    let mut fields = fields.split(' ');
    let open_files = fields
        .next()
        .and_then(|count| count.parse().ok())
        .ok_or_else(unexpected)?;
    let backing_id = match (fields.next(), fields.next(), fields.next()) {
        (None, _, _) => None,
        (Some("backing"), Some(id), None) => Some(id.parse().map_err(|_| unexpected())?),
        _ => return Err(unexpected()),
    };
    let fuse_fd = fuse_fd.ok_or("the daemon sent no FUSE connection")?;
    Ok(fuse_blk_loop::Handover {
        fuse_fd,
        open_files,
        backing_id,
    })
}

/// Asks the daemon of a device for its backend's connection state (see
/// [`backend::connection_status`]); None if it has none or does not answer
/// within a second (it answers one command at a time, and may be
/// detaching).
pub fn request_status(dir: &DeviceDir) -> Option<String> {
    let stream = UnixStream::connect(dir.control_socket()).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    (&stream).write_all(b"status\n").ok()?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).ok()?;
    let status = answer.trim_end().strip_prefix("ok ")?;
    Some(status.to_owned())
}

/// Asks the daemon of a device to detach; returns its answer.
pub fn request_detach(dir: &DeviceDir) -> Result<(), String> {
    request(dir, "detach")
}

/// Sends `command` to the daemon of a device over its control socket;
/// `Ok` if it answers `ok`, its message if it answers `error MESSAGE`.
pub fn request(dir: &DeviceDir, command: &str) -> Result<(), String> {
    let stream = UnixStream::connect(dir.control_socket())
        .map_err(|e| format!("{}: {e}", dir.control_socket().display()))?;
    (&stream)
        .write_all(format!("{command}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    match answer.trim_end().split_once(' ') {
        _ if answer.trim_end() == "ok" => Ok(()),
        Some(("error", message)) => Err(message.to_owned()),
        _ => Err(format!(
            "unexpected answer from the daemon: {:?}",
            answer.trim_end()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_blk_loop::StockOptions;
    use std::io::Read;

    /// A stock-path device of 16 MiB in memory with its directory, as
    /// `attach` leaves them just before serving.
    fn stock_device(test: &str) -> (Served, DeviceDir, DeviceState) {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "this test mounts FUSE and binds a loop device: run it as root"
        );
        let dir = DeviceDir {
            path: PathBuf::from(format!(
                "/run/fuse-blk-test/unit-{test}-{}",
                std::process::id()
            )),
        };
        let _ = dir.remove();
        std::fs::create_dir_all(&dir.path).expect("device directory");
        let backend: fuse_blk_backends::BackendSpec = "mem:16M".parse().expect("backend");
        let device = backend.open(false, 4096).expect("mem backend");
        let options = StockOptions {
            mountpoint: dir.mountpoint(),
            name: test.into(),
            threads: 2,
            io: fuse_blk::IoMode::ReadWrite,
            passthrough: false,
            ring_poll: fuse_blk::DEFAULT_RING_POLL,
        };
        let stock = StockDevice::attach(device, &options).expect("attaching");
        let record = DeviceState {
            name: test.into(),
            device: stock.device_path().display().to_string(),
            transport: "loop".into(),
            backend: backend.to_string(),
            size: 16 << 20,
            block_size: 4096,
            read_only: false,
            pid: std::process::id(),
            start_time: None,
            mountpoint: dir.mountpoint().display().to_string(),
            dev_id: None,
            passthrough: false,
            io: None,
            ring_poll_us: None,
            threads: None,
            reconnect_timeout_ms: None,
            command_timeout_ms: None,
            rbd_id: None,
            rbd_conf: None,
            rbd_keyring: None,
            qcow2_l2_cache: None,
            qcow2_refcount_cache: None,
            qcow2_compress: false,
        };
        dir.write(&record).expect("state");
        (Served::Device(AttachedDevice::from(stock)), dir, record)
    }

    #[test]
    fn a_thread_that_cannot_start_leaves_nothing_behind() {
        for (failing, what) in [("signals", "signal"), ("control", "control")] {
            let test = format!("spawn-{failing}");
            let test = test.as_str();
            let (served, dir, record) = stock_device(test);
            let loop_name = Path::new(&record.device)
                .file_name()
                .and_then(|n| n.to_str())
                .expect("loop name")
                .to_owned();
            assert!(fuse_blk_loop::loopdev::backing_file(&loop_name).is_some());
            let (ready_read, ready_write) = nix::unistd::pipe().expect("pipe");
            let spawn = move |name: &'static str, body: Box<dyn FnOnce() + Send>| {
                if name == failing {
                    return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
                }
                spawn_thread(name, body)
            };
            let result = serve_with(
                served,
                dir.clone(),
                record.clone(),
                Readiness::Pipe(File::from(ready_write)),
                false,
                &spawn,
            );
            let message = result.expect_err("serving without its thread");
            assert!(
                message.starts_with(&format!("starting the {what} thread: ")),
                "{message}"
            );
            assert!(!message.contains('\n'), "one line: {message:?}");
            let mut told = String::new();
            File::from(ready_read)
                .read_to_string(&mut told)
                .expect("readiness");
            assert_eq!(told, format!("error {message}\n"));
            assert_eq!(
                fuse_blk_loop::loopdev::backing_file(&loop_name),
                None,
                "{}: loop device still bound",
                record.device
            );
            assert!(
                !fuse_blk_loop::mount::is_mountpoint(Path::new(&record.mountpoint)),
                "FUSE still mounted"
            );
            assert!(!dir.path.exists(), "{} left", dir.path.display());
        }
    }
}
