//! The character device `/dev/dm-user/NAME`, served through CUSE: one
//! `/dev/cuse` connection whose requests (OPEN, READ, WRITE, POLL, FLUSH,
//! RELEASE, INTERRUPT) a thread turns into calls of the [`Bridge`].

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_blk_proto::abi::{self, opcode, CuseInitOut, OpenOut, PollOut, WriteOut};
use fuse_blk_proto::cuse::CuseRequest;
use fuse_blk_proto::cuse::{encode_cuse_init_reply, encode_poll_wakeup, parse_cuse_request};
use fuse_blk_proto::reply::{error_header, success_header};
use fuse_blk_proto::Operation;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use zerocopy::IntoBytes;

use crate::bridge::{Action, Bridge, ReadOutcome};

/// CUSE's channel.
pub const CUSE_PATH: &str = "/dev/cuse";
/// Largest chunk of one read or write on the device (the kernel splits
/// larger calls; it caps this at its own limit, 128 KiB by default).
const MAX_IO: u32 = 1 << 20;
/// Minor version of the FUSE protocol claimed in the CUSE_INIT reply.
const MINOR: u32 = 31;

/// Writes replies on the connection from any thread.
pub struct Connection {
    file: File,
}

impl Connection {
    fn send(&self, bytes: &[u8]) {
        match (&self.file).write(bytes) {
            Ok(_) => {}
            // The request was interrupted and is gone, or the connection
            // ended: nobody waits for this answer any more.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {}
            Err(e) => log::warn!("dm-user: replying on {CUSE_PATH}: {e}"),
        }
    }

    fn reply(&self, unique: u64, payload: &[u8]) {
        let mut out = success_header(unique, payload.len()).as_bytes().to_vec();
        out.extend_from_slice(payload);
        self.send(&out);
    }

    fn error(&self, unique: u64, errno: i32) {
        self.send(error_header(unique, errno).as_bytes());
    }

    /// Does what the bridge asked: answers parked reads, wakes pollers.
    pub fn perform(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Reply {
                    unique,
                    result: Ok(data),
                } => self.reply(unique, &data),
                Action::Reply {
                    unique,
                    result: Err(errno),
                } => self.error(unique, errno),
                Action::PollWakeup(kh) => self.send(&encode_poll_wakeup(kh)),
            }
        }
    }
}

/// A served `/dev/dm-user/NAME`.
pub struct CuseDevice {
    connection: Arc<Connection>,
    stop: Arc<AtomicBool>,
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
    node: PathBuf,
    /// The node was made here (no devtmpfs made it) and is removed here.
    made_node: bool,
}

fn cuse_missing() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{CUSE_PATH} is missing: the dm-user bridge needs the cuse kernel module (modprobe cuse)"),
    )
}

impl CuseDevice {
    /// Creates `/dev/DEVNAME` (e.g. `dm-user/NAME`) served by `bridge`.
    pub fn create(devname: &str, bridge: Arc<Bridge>) -> io::Result<CuseDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(CUSE_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => cuse_missing(),
                _ => io::Error::new(e.kind(), format!("{CUSE_PATH}: {e}")),
            })?;
        let mut buf = vec![0u8; MAX_IO as usize + 4096];
        let n = (&file).read(&mut buf)?;
        let init = match parse_cuse_request(&buf[..n]) {
            Ok(CuseRequest::Init { header, arg }) => (header.unique, arg),
            other => {
                return Err(io::Error::other(format!(
                    "{CUSE_PATH}: expected CUSE_INIT, got {other:?}"
                )))
            }
        };
        let (unique, arg) = init;
        if arg.major != abi::KERNEL_VERSION || arg.minor < 11 {
            return Err(io::Error::other(format!(
                "{CUSE_PATH}: protocol {}.{} is not spoken",
                arg.major, arg.minor
            )));
        }
        let out = CuseInitOut {
            major: abi::KERNEL_VERSION,
            minor: arg.minor.min(MINOR),
            max_read: MAX_IO,
            max_write: MAX_IO,
            ..CuseInitOut::default()
        };
        let reply = encode_cuse_init_reply(unique, &out, devname)
            .ok_or_else(|| io::Error::other(format!("bad device name {devname:?}")))?;
        (&file).write_all(&reply)?;
        // The kernel registers the device in the reply's write; a taken
        // name aborts the connection instead.
        let sysfs = Path::new("/sys/class/cuse").join(devname.replace('/', "!"));
        let numbers = std::fs::read_to_string(sysfs.join("dev")).map_err(|_| {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("/dev/{devname}: CUSE refused the name (is it taken?)"),
            )
        })?;
        let node = Path::new("/dev").join(devname);
        let made_node = ensure_node(&node, numbers.trim())?;

        let connection = Arc::new(Connection { file });
        let stop = Arc::new(AtomicBool::new(false));
        let (wake_fd, wake) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let thread = {
            let connection = connection.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("dm-user-cuse".into())
                .spawn(move || serve(&connection, &bridge, &stop, &wake_fd, buf))?
        };
        Ok(CuseDevice {
            connection,
            stop,
            wake,
            thread: Some(thread),
            node,
            made_node,
        })
    }

    /// The node the kernel made, `/dev/dm-user/NAME`.
    pub fn node(&self) -> &Path {
        &self.node
    }

    /// The FUSE connection the bridge's actions are performed on.
    pub fn connection(&self) -> Arc<Connection> {
        self.connection.clone()
    }

    /// Stops serving: the node goes away with the connection.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a live buffer to the pipe we own.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if self.made_node {
            let _ = std::fs::remove_file(&self.node);
            if let Some(parent) = self.node.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

impl Drop for CuseDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for devtmpfs to make the node of device `numbers` ("MAJ:MIN");
/// makes it where none comes. Returns whether it was made here.
fn ensure_node(node: &Path, numbers: &str) -> io::Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if std::fs::metadata(node).is_ok_and(|m| m.file_type().is_char_device()) {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (major, minor) = numbers
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| io::Error::other(format!("bad device numbers {numbers:?}")))?;
    if let Some(parent) = node.parent() {
        std::fs::create_dir_all(parent)?;
    }
    nix::sys::stat::mknod(
        node,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(major, minor),
    )
    .map_err(|e| io::Error::other(format!("{}: mknod: {e}", node.display())))?;
    Ok(true)
}

/// The connection's thread: reads and answers requests until stopped or
/// the connection ends; expires waiting messages about once a second.
fn serve(
    connection: &Connection,
    bridge: &Bridge,
    stop: &AtomicBool,
    wake: &OwnedFd,
    mut buf: Vec<u8>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [
            PollFd::new(connection.file.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::from(1000u16)) {
            Ok(0) => {
                bridge.expire(Instant::now());
                continue;
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("dm-user: polling {CUSE_PATH}: {e}");
                return;
            }
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if !revents.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP) {
            continue;
        }
        let n = match (&connection.file).read(&mut buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                Some(libc::ENODEV) => {
                    log::info!("dm-user: the CUSE connection ended");
                    return;
                }
                _ => {
                    log::error!("dm-user: reading {CUSE_PATH}: {e}");
                    return;
                }
            },
        };
        handle(connection, bridge, &buf[..n]);
    }
}

fn handle(connection: &Connection, bridge: &Bridge, message: &[u8]) {
    let request = match parse_cuse_request(message) {
        Ok(request) => request,
        Err(e) => {
            log::warn!("dm-user: unparsable CUSE request: {e}");
            if let Some(header) = e.header {
                connection.error(header.unique, libc::EINVAL);
            }
            return;
        }
    };
    let unique = request.unique();
    let request = match request {
        CuseRequest::Init { .. } => return connection.error(unique, libc::EPROTO),
        CuseRequest::Poll { arg, .. } => {
            let notify = (arg.flags & abi::poll_flags::SCHEDULE_NOTIFY != 0).then_some(arg.kh);
            let out = PollOut {
                revents: bridge.poll(arg.fh, notify) & arg.events,
                padding: 0,
            };
            return connection.reply(unique, out.as_bytes());
        }
        CuseRequest::File(request) => request,
    };
    match request.operation {
        Operation::Open(_) => {
            let out = OpenOut {
                fh: bridge.open(),
                open_flags: abi::fopen::DIRECT_IO | abi::fopen::NONSEEKABLE,
                backing_id: 0,
            };
            connection.reply(unique, out.as_bytes());
        }
        Operation::Read(arg) => {
            let nonblock = arg.flags as i32 & libc::O_NONBLOCK != 0;
            match bridge.read(arg.fh, unique, arg.offset, arg.size as usize, nonblock) {
                ReadOutcome::Data(data) => connection.reply(unique, &data),
                ReadOutcome::Error(errno) => connection.error(unique, errno),
                ReadOutcome::Parked => {}
            }
        }
        Operation::Write { arg, data } => match bridge.write(arg.fh, data) {
            Ok(n) => {
                let out = WriteOut {
                    size: n as u32,
                    padding: 0,
                };
                connection.reply(unique, out.as_bytes());
            }
            Err(errno) => connection.error(unique, errno),
        },
        Operation::Flush(_) => connection.reply(unique, &[]),
        Operation::Release(arg) => {
            let actions = bridge.release(arg.fh);
            connection.reply(unique, &[]);
            connection.perform(actions);
        }
        Operation::Interrupt(arg) => connection.perform(bridge.interrupt(arg.unique)),
        Operation::Forget(_) | Operation::BatchForget { .. } => {}
        Operation::Unsupported(opcode::IOCTL) => connection.error(unique, libc::ENOTTY),
        _ => connection.error(unique, libc::ENOSYS),
    }
}
