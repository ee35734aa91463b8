//! Helpers for the kernel-module tests in the VM guest (tests/vm/cases):
//! daemons that record what reaches them, that misbehave on purpose, or
//! that serve a `fuser::Filesystem`, plus raw control ioctls.
//!
//! Usage:
//!
//! ```text
//! fuse-blk-vmtest recorder SIZE LOG     serve a recording memory device
//! fuse-blk-vmtest fuser SIZE            serve ImageFs through the adapter
//! fuse-blk-vmtest fuser-file IMAGE QUEUES
//!                                       serve ImageFs on a host file through the
//!                                       adapter, over read/write channels
//! fuse-blk-vmtest fuser-file-takeover IMAGE ID
//!                                       take device ID over from such a daemon,
//!                                       one queue at a time
//! fuse-blk-vmtest garbage               misbehave on a device; check the refusals
//! fuse-blk-vmtest ring-garbage          the same through io_uring commands, and
//!                                       rings that go away at every stage
//! fuse-blk-vmtest garbage-soak COUNT [SEED [SECONDS]]
//!                                       COUNT seeded garbage replies and io_uring
//!                                       commits, each checked against the driver's rules
//! fuse-blk-vmtest takeover              racing takeovers, RWF_NOWAIT reads and stale
//!                                       replies, message by message
//! fuse-blk-vmtest passthrough-refusals  CREATE refuses backing files it cannot use
//! fuse-blk-vmtest hold SIZE [fail-inflight]
//!                                       serve a memory device with recovery on
//!                                       that never answers reads at 1 MiB
//! fuse-blk-vmtest resume ID SIZE        serve device ID (after its daemon died)
//!                                       with a fresh memory device
//! fuse-blk-vmtest destroy ID            FUSE_BLK_IOC_DESTROY, whatever the device's state
//! fuse-blk-vmtest info ID               print FUSE_BLK_IOC_GET_INFO
//! fuse-blk-vmtest resize ID SIZE        FUSE_BLK_IOC_RESIZE alone (no daemon asked)
//! fuse-blk-vmtest create NAME           FUSE_BLK_IOC_CREATE of a 16 MiB device named
//!                                       NAME, then DESTROY
//! fuse-blk-vmtest takeover-queue ID     FUSE_BLK_IOC_ATTACH with TAKEOVER of queue 0,
//!                                       then close
//! fuse-blk-vmtest features              print the module's feature flags by name
//!                                       (FUSE_BLK_IOC_GET_FEATURES), one line
//! fuse-blk-vmtest dm-user-serve NODE SIZE DESCRIPTORS
//!                                       be a dm-user daemon on NODE: a memory device
//!                                       of SIZE served through fuse-blk's engine
//!                                       (compat/dm-user channel.rs), until ENOTBLK
//! ```
//!
//! Serving commands print the device path on stdout once it is ready and
//! serve until the device is destroyed.

mod garbage_soak;
mod passthrough;
mod ring_garbage;
mod takeover;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use fuse_blk::proto::abi::{self, opcode, InHeader, InitOut, OutHeader, WriteOut};
use fuse_blk::{
    BlockDevice, Features, Geometry, IoMode, ReplyData, ReplyEmpty, ReplyWrite, Request, Session,
};
use fuse_blk_backends::MemDevice;
use fuse_blk_fuser::{FuserDevice, FuserOptions};
use fuse_blk_kmod::{attach_channel, attach_fd, Control, KmodDevice, KmodOptions};
use fuse_blk_tests::image_fs::ImageFs;
use fuse_blk_tests::random_bytes;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["recorder", size, log] => recorder(parse(size), log),
        ["fuser", size] => serve_fuser(parse(size)),
        ["fuser-file", image, queues] => serve_fuser_file(image, parse(queues) as u16),
        ["fuser-file-takeover", image, id] => take_over_fuser_file(image, parse(id) as u32),
        ["garbage"] => garbage(),
        ["ring-garbage"] => ring_garbage::run(),
        ["garbage-soak", rest @ ..] => garbage_soak::run(rest),
        ["takeover"] => takeover::run(),
        ["passthrough-refusals"] => passthrough::refusals(),
        ["hold", size] => hold(parse(size), false),
        ["hold", size, "fail-inflight"] => hold(parse(size), true),
        ["resume", id, size] => {
            let device = Arc::new(MemDevice::new(parse(size), 512).expect("mem device"));
            let resumed = KmodDevice::resume(
                device,
                parse(id) as u32,
                Default::default(),
                fuse_blk::DEFAULT_RING_POLL,
            );
            resumed.and_then(wait_serving)
        }
        ["destroy", id] => Control::open().and_then(|c| c.destroy(parse(id) as u32)),
        ["info", id] => Control::open()
            .and_then(|c| c.info(parse(id) as u32))
            .map(|info| {
                println!(
                    "state={} channels={} inflight={} dev_id={} size={}",
                    info.state,
                    info.nr_channels,
                    info.inflight,
                    info.params.dev_id,
                    info.params.size
                )
            }),
        ["dm-user-serve", node, size, descriptors] => MemDevice::new(parse(size), 512)
            .and_then(|device| {
                fuse_blk_dm_user::channel::serve_node(
                    Arc::new(device),
                    std::path::Path::new(node),
                    parse(descriptors) as u16,
                    1 << 20,
                )
            })
            .map(|()| println!("dm-user-serve: the target is gone")),
        ["resize", id, size] => {
            Control::open().and_then(|c| c.resize(parse(id) as u32, parse(size)))
        }
        ["create", name] => Control::open().and_then(|control| {
            let options = KmodOptions {
                name: (*name).to_owned(),
                ..KmodOptions::default()
            };
            let params = fuse_blk_kmod::params_for(&Geometry::new(16 << 20, 512), &options);
            let created = control.create(&params)?;
            control.destroy(created.dev_id)
        }),
        ["takeover-queue", id] => attach_fd(parse(id) as u32, 0, true).map(drop),
        ["features"] => Control::open().and_then(|c| c.features()).map(|features| {
            println!(
                "{}",
                fuse_blk_kmod::uapi::feature_names(features.features).join(" ")
            )
        }),
        _ => Err(io::Error::other(
            "usage: see the top of tests/src/bin/fuse-blk-vmtest.rs",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fuse-blk-vmtest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(text: &str) -> u64 {
    fuse_blk_backends::parse_size(text).unwrap_or_else(|e| panic!("{e}"))
}

fn serve(device: Arc<dyn BlockDevice>, options: KmodOptions) -> io::Result<()> {
    wait_serving(KmodDevice::create(device, &options)?)
}

/// Prints the device's path, then serves it until it is destroyed or
/// handed over.
fn wait_serving(kmod: KmodDevice) -> io::Result<()> {
    println!("{}", kmod.device_path().display());
    io::stdout().flush()?;
    kmod.wait().map(drop)
}

/// A memory device that appends one line per flush and per FUA write to
/// LOG, so that a test can see what reached the handler.
struct Recorder {
    inner: MemDevice,
    log: Mutex<std::fs::File>,
}

impl Recorder {
    fn note(&self, line: &str) {
        let mut log = self.log.lock().unwrap();
        let _ = writeln!(log, "{line}");
    }
}

impl BlockDevice for Recorder {
    fn geometry(&self) -> Geometry {
        Geometry {
            features: Features::ALL,
            ..self.inner.geometry()
        }
    }

    fn read(&self, req: &Request, offset: u64, len: u32, reply: ReplyData) {
        self.inner.read(req, offset, len, reply)
    }

    fn write(&self, req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        if fua {
            self.note(&format!("fua {offset} {}", data.len()));
        }
        self.inner.write(req, offset, data, fua, reply)
    }

    fn flush(&self, req: &Request, reply: ReplyEmpty) {
        self.note("flush");
        self.inner.flush(req, reply)
    }

    fn discard(&self, req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        self.note(&format!("discard {offset} {len}"));
        self.inner.discard(req, offset, len, reply)
    }

    fn write_zeroes(
        &self,
        req: &Request,
        offset: u64,
        len: u64,
        may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        self.note(&format!("write_zeroes {offset} {len}"));
        self.inner.write_zeroes(req, offset, len, may_unmap, reply)
    }
}

/// A memory device that never answers reads at [`HELD_OFFSET`]: they stay
/// with the daemon (in flight) until it dies.
const HELD_OFFSET: u64 = 1 << 20;

struct Hold {
    inner: MemDevice,
    held: Mutex<Vec<ReplyData>>,
}

impl BlockDevice for Hold {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn read(&self, req: &Request, offset: u64, len: u32, reply: ReplyData) {
        if offset == HELD_OFFSET {
            self.held.lock().unwrap().push(reply);
        } else {
            self.inner.read(req, offset, len, reply)
        }
    }

    fn write(&self, req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        self.inner.write(req, offset, data, fua, reply)
    }
}

fn hold(size: u64, fail_inflight: bool) -> io::Result<()> {
    let device = Hold {
        inner: MemDevice::new(size, 512)?,
        held: Mutex::new(Vec::new()),
    };
    serve(
        Arc::new(device),
        KmodOptions {
            name: "hold".into(),
            queues: 1,
            io_timeout_ms: 600_000,
            recovery_timeout_ms: Some(600_000),
            fail_inflight,
            ..KmodOptions::default()
        },
    )
}

fn recorder(size: u64, log: &str) -> io::Result<()> {
    let log = OpenOptions::new().create(true).append(true).open(log)?;
    let device = Recorder {
        inner: MemDevice::new(size, 512)?,
        log: Mutex::new(log),
    };
    serve(
        Arc::new(device),
        KmodOptions {
            name: "recorder".into(),
            queues: 2,
            ..KmodOptions::default()
        },
    )
}

fn serve_fuser(size: u64) -> io::Result<()> {
    let (fs, _image) = ImageFs::new(size as usize);
    let device = FuserDevice::new(fs, FuserOptions::new("disk.img"))?;
    serve(
        Arc::new(device),
        KmodOptions {
            name: "fuser".into(),
            queues: 1,
            max_io_bytes: fuse_blk_fuser::MAX_CHUNK,
            ..KmodOptions::default()
        },
    )
}

/// ImageFs on the host file IMAGE through the adapter, with 4 KiB blocks.
fn fuser_file(image: &str) -> io::Result<Arc<dyn BlockDevice>> {
    let file = OpenOptions::new().read(true).write(true).open(image)?;
    let options = FuserOptions {
        logical_block_size: 4096,
        threads: 2,
        ..FuserOptions::new("disk.img")
    };
    Ok(Arc::new(FuserDevice::new(
        ImageFs::on_file(file)?,
        options,
    )?))
}

/// Serves [`fuser_file`] with `queues` read/write channels, for
/// [`take_over_fuser_file`] to take over.
fn serve_fuser_file(image: &str, queues: u16) -> io::Result<()> {
    serve(
        fuser_file(image)?,
        KmodOptions {
            name: "fuserfile".into(),
            queues,
            max_io_bytes: fuse_blk_fuser::MAX_CHUNK,
            io: IoMode::ReadWrite,
            ..KmodOptions::default()
        },
    )
}

/// Takes device `id` over with [`fuser_file`], queue by queue, a pause
/// between two: the old daemon's queues are retired one at a time, and
/// those still its own keep serving requests for a while after the first
/// has gone (as the module allows; `KmodDevice::resume` takes all at once,
/// which leaves hardly any time in between).
fn take_over_fuser_file(image: &str, id: u32) -> io::Result<()> {
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(300);
    let params = Control::open()?.info(id)?.params;
    let config = fuse_blk_kmod::session_config(params.max_io_bytes, fuse_blk::DEFAULT_RING_POLL);
    let session = Arc::new(Session::new(fuser_file(image)?, config)?);
    println!("/dev/fuseblk{id}");
    io::stdout().flush()?;
    session.serve_with(params.nr_queues, move |session, queue| {
        std::thread::sleep(PAUSE * u32::from(queue));
        let channel = attach_channel(id, queue, true)?;
        session.run_worker(queue, Arc::new(channel))
    })
}

/// Writes one reply and returns the errno the driver answered, if any.
fn write_reply(channel: &std::fs::File, bytes: &[u8]) -> Option<i32> {
    match nix::unistd::write(channel, bytes) {
        Ok(_) => None,
        Err(e) => Some(e as i32),
    }
}

fn expect_refused(
    what: &str,
    channel: &std::fs::File,
    bytes: &[u8],
    errnos: &[i32],
) -> io::Result<()> {
    match write_reply(channel, bytes) {
        Some(errno) if errnos.contains(&errno) => {
            println!("refused as expected: {what} (errno {errno})");
            Ok(())
        }
        other => Err(io::Error::other(format!(
            "{what}: expected one of {errnos:?}, got {other:?}"
        ))),
    }
}

fn reply_bytes(unique: u64, error: i32, payload: &[u8], claimed_len: Option<u32>) -> Vec<u8> {
    let header = OutHeader {
        len: claimed_len.unwrap_or((std::mem::size_of::<OutHeader>() + payload.len()) as u32),
        error,
        unique,
    };
    let mut out = zerocopy::IntoBytes::as_bytes(&header).to_vec();
    out.extend_from_slice(payload);
    out
}

fn read_message(channel: &std::fs::File, buf: &mut [u8]) -> io::Result<(InHeader, Vec<u8>)> {
    let n = nix::unistd::read(channel, buf).map_err(io::Error::from)?;
    let (header, body) = <InHeader as zerocopy::FromBytes>::read_from_prefix(&buf[..n])
        .map_err(|_| io::Error::other("short message from the driver"))?;
    if header.len as usize != n {
        return Err(io::Error::other("driver message length mismatch"));
    }
    Ok((header, body.to_vec()))
}

/// Creates a device, misbehaves on its channel in every way the driver must
/// refuse, then answers properly to show the device still works, and
/// destroys it. A reader process (`dd`) supplies the requests.
fn garbage() -> io::Result<()> {
    use zerocopy::IntoBytes;
    with_raw_device("garbage", |id| {
        let channel: std::fs::File = std::fs::File::from(attach_fd(id, 0, false)?);
        let mut buf = vec![0u8; (2 << 20) + 4096];
        // A buffer smaller than the largest message is refused.
        match nix::unistd::read(&channel, &mut buf[..4096]) {
            Err(nix::errno::Errno::EINVAL) => println!("refused as expected: small read buffer"),
            other => return Err(io::Error::other(format!("small buffer: {other:?}"))),
        }
        let (init, _) = read_message(&channel, &mut buf)?;
        if init.opcode != opcode::INIT {
            return Err(io::Error::other(format!(
                "first message is opcode {}",
                init.opcode
            )));
        }
        // Garbage before INIT is answered: random bytes, lying lengths.
        for seed in 0..64u64 {
            let len = 1 + (seed as usize * 37) % 300;
            let junk = random_bytes(seed, len);
            if write_reply(&channel, &junk).is_none() {
                // Random bytes could form a valid-looking reply only by
                // naming the INIT unique; random data never does.
                return Err(io::Error::other(format!(
                    "random reply {seed} was accepted"
                )));
            }
        }
        println!("refused as expected: 64 random replies");
        expect_refused(
            "header longer than the write",
            &channel,
            &reply_bytes(init.unique, 0, &[], Some(64)),
            &[libc::EINVAL],
        )?;
        expect_refused(
            "header shorter than the write",
            &channel,
            &reply_bytes(init.unique, 0, &[0; 64], Some(16)),
            &[libc::EINVAL],
        )?;
        expect_refused(
            "positive error",
            &channel,
            &reply_bytes(init.unique, 5, &[], None),
            &[libc::EINVAL],
        )?;
        expect_refused(
            "absurd error",
            &channel,
            &reply_bytes(init.unique, -100_000, &[], None),
            &[libc::EINVAL],
        )?;
        expect_refused(
            "short INIT reply",
            &channel,
            &reply_bytes(init.unique, 0, &[0; 8], None),
            &[libc::EINVAL],
        )?;
        let bad_major = InitOut {
            major: 6,
            minor: 31,
            max_write: 1 << 20,
            ..InitOut::default()
        };
        expect_refused(
            "wrong major",
            &channel,
            &reply_bytes(init.unique, 0, bad_major.as_bytes(), None),
            &[libc::EINVAL],
        )?;
        let small_write = InitOut {
            major: 7,
            minor: 31,
            max_write: 4096,
            ..InitOut::default()
        };
        expect_refused(
            "max_write below max_io_bytes",
            &channel,
            &reply_bytes(init.unique, 0, small_write.as_bytes(), None),
            &[libc::EINVAL],
        )?;
        let good = InitOut {
            major: 7,
            minor: 31,
            max_write: 1 << 20,
            ..InitOut::default()
        };
        if let Some(errno) = write_reply(
            &channel,
            &reply_bytes(init.unique, 0, good.as_bytes(), None),
        ) {
            return Err(io::Error::other(format!("valid INIT refused: {errno}")));
        }
        expect_refused(
            "duplicate INIT reply",
            &channel,
            &reply_bytes(init.unique, 0, good.as_bytes(), None),
            &[libc::ENOENT],
        )?;

        // Now a real request: a reader of the first 4 KiB.
        let device = format!("/dev/fuseblk{id}");
        let mut reader = std::process::Command::new("dd")
            .args([
                format!("if={device}"),
                "of=/dev/null".into(),
                "bs=4096".into(),
                "count=1".into(),
                "iflag=direct".into(),
            ])
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let (read, body) = read_message(&channel, &mut buf)?;
        if read.opcode != opcode::READ || read.nodeid != 2 {
            return Err(io::Error::other(format!(
                "expected READ of node 2, got opcode {} node {}",
                read.opcode, read.nodeid
            )));
        }
        let read_in = <abi::ReadIn as zerocopy::FromBytes>::read_from_prefix(&body)
            .map_err(|_| io::Error::other("short READ"))?
            .0;
        let size = read_in.size as usize;
        expect_refused(
            "unknown unique",
            &channel,
            &reply_bytes(read.unique ^ (1 << 40), 0, &vec![0; size], None),
            &[libc::ENOENT],
        )?;
        expect_refused(
            "unique with a tag past the queue depth",
            &channel,
            &reply_bytes(0xfff0, 0, &vec![0; size], None),
            &[libc::ENOENT],
        )?;
        expect_refused(
            "short read data",
            &channel,
            &reply_bytes(read.unique, 0, &vec![0; size - 512], None),
            &[libc::EINVAL],
        )?;
        expect_refused(
            "long read data",
            &channel,
            &reply_bytes(read.unique, 0, &vec![0; size + 512], None),
            &[libc::EINVAL],
        )?;
        expect_refused(
            "error with data",
            &channel,
            &reply_bytes(read.unique, -5, &[1, 2, 3, 4], None),
            &[libc::EINVAL],
        )?;
        expect_refused(
            "write_out for a read",
            &channel,
            &reply_bytes(
                read.unique,
                0,
                WriteOut {
                    size: size as u32,
                    padding: 0,
                }
                .as_bytes(),
                None,
            ),
            &[libc::EINVAL],
        )?;
        // An interrupt reply is accepted and ignored.
        if write_reply(
            &channel,
            &reply_bytes(read.unique | 1, -libc::EAGAIN, &[], None),
        )
        .is_some()
        {
            return Err(io::Error::other("interrupt reply refused"));
        }
        let data = random_bytes(99, size);
        if let Some(errno) = write_reply(&channel, &reply_bytes(read.unique, 0, &data, None)) {
            return Err(io::Error::other(format!(
                "valid READ reply refused: {errno}"
            )));
        }
        expect_refused(
            "duplicate READ reply",
            &channel,
            &reply_bytes(read.unique, 0, &data, None),
            &[libc::ENOENT],
        )?;
        // The partition scan and the reader may send more: answer zeros
        // until the reader is done.
        takeover::serve_reader(&channel, &mut buf, &mut reader)?;
        println!("device usable after garbage");
        Ok(())
    })
}

/// Creates a device of one queue (8 MiB of 512-byte blocks, a 60 s I/O
/// timeout) with no daemon, for `check` to drive its channels by hand
/// with the device's id; destroys it afterwards, whatever `check` did.
fn with_raw_device(name: &str, check: impl FnOnce(u32) -> io::Result<()>) -> io::Result<()> {
    let control = Control::open()?;
    let geometry = Geometry::new(8 << 20, 512);
    let params = control.create(&fuse_blk_kmod::params_for(
        &geometry,
        &KmodOptions {
            name: name.into(),
            queues: 1,
            io_timeout_ms: 60_000,
            ..KmodOptions::default()
        },
    ))?;
    let result = check(params.dev_id);
    let destroyed = control.destroy(params.dev_id);
    result.and(destroyed)
}
