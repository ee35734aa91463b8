//! The block device: each request is one of librbd's asynchronous calls,
//! issued on the handler's thread (librbd takes them from any thread, so
//! the device's queues issue in parallel); one thread collects librbd's
//! completions and answers them.
//!
//! Completions are collected without a C callback into Rust: the image
//! signals an eventfd when an asynchronous call completes
//! (`rbd_set_image_notification`), and the thread takes the completed
//! calls with `rbd_poll_io_events`. Each call carries its request (the
//! reply, and the buffer librbd reads into or writes from) as the
//! completion's argument, boxed, until the thread takes it back.

use std::ffi::{c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fuse_blk::{BlockDevice, Features, Geometry, ReplyData, ReplyEmpty, ReplyWrite, Request};

use crate::ffi::{self, CompletionT, ImageT};
use crate::image::{Credentials, Image, Info};
use crate::spec::Spec;

/// How long `destroy` waits for the calls librbd still holds (an OSD
/// that is down holds them for good) before it leaves them, and the
/// image, to the process's exit.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Completions taken per `rbd_poll_io_events` call.
const POLL_BATCH: usize = 64;

/// The largest physical block size reported, whatever the object size
/// (4 MiB by default: the kernel would align every write to it).
const MAX_PHYSICAL_BLOCK: u64 = 64 << 10;

/// A call librbd holds: what answers it.
enum Pending {
    /// A read into `buffer`'s capacity of `len` bytes.
    Read {
        buffer: Vec<u8>,
        len: usize,
        reply: ReplyData,
    },
    /// A write of `_data`, kept alive until librbd is done with it.
    Write {
        _data: Vec<u8>,
        reply: ReplyWrite,
    },
    Empty(ReplyEmpty),
}

impl Pending {
    /// Answers with librbd's return value: negative is `-errno`.
    fn answer(self, rc: isize) {
        let errno = (rc < 0).then(|| i32::try_from(-rc).unwrap_or(libc::EIO));
        match (self, errno) {
            (
                Pending::Read {
                    mut buffer,
                    len,
                    reply,
                },
                None,
            ) => {
                if rc as usize != len {
                    log::error!("rbd: a read of {len} bytes returned {rc}");
                    return reply.error(libc::EIO);
                }
                // SAFETY: librbd filled the `len` bytes (its return value
                // says so) of the capacity reserved for them, which was
                // never reallocated.
                unsafe { buffer.set_len(len) };
                reply.data(&buffer);
            }
            (Pending::Read { reply, .. }, Some(errno)) => reply.error(errno),
            (Pending::Write { reply, .. }, None) => reply.ok(),
            (Pending::Write { reply, .. }, Some(errno)) => reply.error(errno),
            (Pending::Empty(reply), None) => reply.ok(),
            (Pending::Empty(reply), Some(errno)) => reply.error(errno),
        }
    }
}

/// What the handler threads and the completion thread share.
struct Shared {
    image: Image,
    /// Signalled by librbd when a call completes, and by `destroy`.
    event: OwnedFd,
    /// Calls issued and not answered yet.
    in_flight: AtomicUsize,
    /// Set by `destroy`: new requests fail with EIO.
    stopping: AtomicBool,
}

impl Shared {
    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: the eventfd is open for the life of `self`; 8 bytes is
        // what an eventfd write takes. A full counter already wakes.
        unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Issues one call: `call` gets the image and a completion that
    /// carries `pending`, and returns librbd's result. A call librbd
    /// refuses is answered at once.
    fn issue(&self, pending: Pending, call: impl FnOnce(ImageT, CompletionT) -> c_int) {
        if self.stopping.load(Ordering::Acquire) {
            return pending.answer(-(libc::EIO as isize));
        }
        let api = ffi::api();
        let arg = Box::into_raw(Box::new(pending));
        let mut completion: CompletionT = ptr::null_mut();
        // SAFETY: `completion` is a valid out-pointer; no callback: the
        // completion is collected through the eventfd.
        let rc =
            unsafe { (api.rbd_aio_create_completion)(arg.cast::<c_void>(), None, &mut completion) };
        if rc < 0 {
            // SAFETY: `arg` came from Box::into_raw above and librbd
            // did not take it.
            let pending = unsafe { Box::from_raw(arg) };
            return pending.answer(rc as isize);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let rc = call(self.image.raw(), completion);
        if rc < 0 {
            // SAFETY: librbd refused the call, so it never completes:
            // the completion and its argument are still ours alone.
            unsafe { (api.rbd_aio_release)(completion) };
            // SAFETY: as above: `arg` is the Box given to the completion.
            let pending = unsafe { Box::from_raw(arg) };
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            pending.answer(rc as isize);
        }
    }

    /// Answers every completed call; returns how many.
    fn collect(&self) -> usize {
        let api = ffi::api();
        let mut completions = [ptr::null_mut::<c_void>(); POLL_BATCH];
        let mut total = 0;
        loop {
            // SAFETY: the image is open; the array has room for the count
            // passed.
            let count = unsafe {
                (api.rbd_poll_io_events)(
                    self.image.raw(),
                    completions.as_mut_ptr(),
                    POLL_BATCH as c_int,
                )
            };
            if count <= 0 {
                return total;
            }
            for &completion in &completions[..count as usize] {
                // SAFETY: a completion librbd handed back, completed, not
                // released yet; its argument is the Box `issue` gave it.
                let (rc, pending) = unsafe {
                    let rc = (api.rbd_aio_get_return_value)(completion);
                    let arg = (api.rbd_aio_get_arg)(completion).cast::<Pending>();
                    (api.rbd_aio_release)(completion);
                    (rc, Box::from_raw(arg))
                };
                pending.answer(rc);
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
            }
            total += count as usize;
        }
    }

    /// The completion thread: waits on the eventfd, answers what
    /// completed; once stopping, ends when nothing is in flight, or after
    /// [`DRAIN_LIMIT`].
    fn run(&self) {
        let mut drain_until: Option<Instant> = None;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                let until = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN_LIMIT);
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                if Instant::now() >= until {
                    log::error!(
                        "rbd: {} calls still held by librbd after {DRAIN_LIMIT:?}; left to the process's exit",
                        self.in_flight.load(Ordering::Acquire)
                    );
                    return;
                }
            }
            let mut poll_fd = libc::pollfd {
                fd: self.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout_ms = if drain_until.is_some() { 100 } else { -1 };
            // SAFETY: one pollfd, alive for the call.
            unsafe { libc::poll(&mut poll_fd, 1, timeout_ms) };
            let mut count = [0u8; 8];
            // SAFETY: reads the eventfd's counter into 8 bytes that
            // outlive the call; EAGAIN (nothing signalled) is harmless.
            unsafe {
                libc::read(
                    self.event.as_raw_fd(),
                    count.as_mut_ptr().cast(),
                    count.len(),
                )
            };
            self.collect();
        }
    }
}

/// A block device whose blocks are an RBD image.
pub struct RbdDevice {
    spec: Spec,
    info: Info,
    geometry: Geometry,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl RbdDevice {
    /// Connects to the cluster and opens the image `spec` names. Every
    /// failure is one line naming the image and the cause.
    pub fn open(
        spec: &Spec,
        credentials: &Credentials,
        read_only: bool,
        logical_block_size: u32,
    ) -> io::Result<RbdDevice> {
        let failure = |e: io::Error| io::Error::new(e.kind(), format!("{spec}: {e}"));
        let image = Image::open(spec, credentials).map_err(failure)?;
        let info = image.info().map_err(failure)?;
        let geometry = geometry(&info, read_only, logical_block_size).map_err(failure)?;
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(failure(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the image is open; the eventfd stays open as long as
        // the image (both live in `Shared`, the fd dropped after).
        let rc = unsafe {
            (ffi::api().rbd_set_image_notification)(
                image.raw(),
                event.as_raw_fd(),
                ffi::EVENT_TYPE_EVENTFD,
            )
        };
        if rc < 0 {
            return Err(failure(io::Error::from_raw_os_error(-rc)));
        }
        let shared = Arc::new(Shared {
            image,
            event,
            in_flight: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("rbd-completions".into())
            .spawn(move || worker.run())
            .map_err(failure)?;
        log::info!(
            "{spec}: {} bytes in objects of {} bytes{}",
            info.size,
            info.object_size,
            if read_only { ", read-only" } else { "" }
        );
        Ok(RbdDevice {
            spec: spec.clone(),
            info,
            geometry,
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The image this device serves.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// The size of the RADOS objects the image is striped over.
    pub fn object_size(&self) -> u64 {
        self.info.object_size
    }

    /// Requests librbd holds now (issued, not answered): while an OSD is
    /// down they wait there.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// What `list` shows: `4 MiB objects, 3 in flight`.
    pub fn status(&self) -> String {
        let size = self.info.object_size;
        let objects = if size >= 1 << 20 && size % (1 << 20) == 0 {
            format!("{} MiB", size >> 20)
        } else {
            format!("{} KiB", size >> 10)
        };
        format!("{objects} objects, {} in flight", self.in_flight())
    }
}

/// The device's shape from the image's.
fn geometry(info: &Info, read_only: bool, block: u32) -> io::Result<Geometry> {
    let invalid = |reason: String| Err(io::Error::new(io::ErrorKind::InvalidInput, reason));
    if info.size == 0 {
        return invalid("the image is empty".to_owned());
    }
    if info.size % u64::from(block) != 0 {
        return invalid(format!(
            "the image's size {} is not a multiple of the block size {block}",
            info.size
        ));
    }
    let physical = info.object_size.min(MAX_PHYSICAL_BLOCK);
    let geometry = Geometry {
        size: info.size,
        logical_block_size: block,
        physical_block_size: if physical.is_power_of_two() && physical > u64::from(block) {
            physical as u32
        } else {
            block
        },
        read_only,
        // FUA: LIBRADOS_OP_FLAG_FADVISE_FUA on the write, which makes
        // librbd's write-around cache wait for the OSD.
        features: Features {
            flush: true,
            fua: !read_only,
            discard: !read_only,
            write_zeroes: !read_only,
        },
    };
    geometry
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    Ok(geometry)
}

impl BlockDevice for RbdDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn read(&self, _req: &Request, offset: u64, len: u32, reply: ReplyData) {
        let len = len as usize;
        let mut buffer = Vec::with_capacity(len);
        let target = buffer.as_mut_ptr();
        let pending = Pending::Read { buffer, len, reply };
        // SAFETY: `target` has room for `len` bytes and stays put (the
        // Vec moved into `pending` keeps its heap buffer) until the
        // completion is collected, which is when `pending` is dropped.
        self.shared.issue(pending, |image, completion| unsafe {
            (ffi::api().rbd_aio_read)(image, offset, len, target.cast(), completion)
        });
    }

    /// The data is copied: the handler's slice is lent for this call only,
    /// and librbd uses it until the call completes.
    fn write(&self, _req: &Request, offset: u64, data: &[u8], fua: bool, reply: ReplyWrite) {
        let flags = if fua { ffi::OP_FLAG_FADVISE_FUA } else { 0 };
        let copy = data.to_vec();
        let source = copy.as_ptr();
        let len = copy.len();
        let pending = Pending::Write { _data: copy, reply };
        // SAFETY: `source` points to `len` bytes that stay put and
        // unchanged until the completion is collected.
        self.shared.issue(pending, |image, completion| unsafe {
            (ffi::api().rbd_aio_write2)(image, offset, len, source.cast(), completion, flags)
        });
    }

    fn flush(&self, _req: &Request, reply: ReplyEmpty) {
        // SAFETY: the image is open; the completion carries the reply.
        self.shared
            .issue(Pending::Empty(reply), |image, completion| unsafe {
                (ffi::api().rbd_aio_flush)(image, completion)
            });
    }

    fn discard(&self, _req: &Request, offset: u64, len: u64, reply: ReplyEmpty) {
        if self.geometry.read_only {
            return reply.error(libc::EROFS);
        }
        // SAFETY: as for flush.
        self.shared
            .issue(Pending::Empty(reply), |image, completion| unsafe {
                (ffi::api().rbd_aio_discard)(image, offset, len, completion)
            });
    }

    /// rbd_aio_write_zeroes deallocates what whole objects it covers
    /// either way: librbd has no "keep allocated" short of
    /// THICK_PROVISION, which writes real zeros; reads return zeros
    /// both ways, which is what write-zeroes promises.
    fn write_zeroes(
        &self,
        _req: &Request,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        reply: ReplyEmpty,
    ) {
        if self.geometry.read_only {
            return reply.error(libc::EROFS);
        }
        let Ok(len) = usize::try_from(len) else {
            return reply.error(libc::EINVAL);
        };
        // SAFETY: as for flush.
        self.shared
            .issue(Pending::Empty(reply), |image, completion| unsafe {
                (ffi::api().rbd_aio_write_zeroes)(image, offset, len, completion, 0, 0)
            });
    }

    /// Waits for what librbd holds (at most 10 s), then ends
    /// the completion thread.
    fn destroy(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.signal();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                log::error!("{}: the completion thread panicked", self.spec);
            }
        }
    }
}

impl Drop for RbdDevice {
    fn drop(&mut self) {
        self.destroy();
        if self.shared.in_flight.load(Ordering::Acquire) != 0 {
            // librbd still holds calls pointing into their buffers and
            // will complete them on this image: closing it, or freeing
            // them, is not safe. The process is ending anyway.
            std::mem::forget(self.shared.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_image() {
        let info = Info {
            size: 256 << 20,
            object_size: 4 << 20,
        };
        let g = geometry(&info, false, 512).unwrap();
        assert_eq!(
            (g.size, g.logical_block_size, g.physical_block_size),
            (256 << 20, 512, 64 << 10)
        );
        assert_eq!(g.features, Features::ALL);
        let g = geometry(&info, true, 4096).unwrap();
        assert!(g.read_only);
        assert_eq!(
            g.features,
            Features {
                flush: true,
                ..Features::default()
            }
        );
    }

    #[test]
    fn geometry_refusals_name_the_cause() {
        let error = |size| {
            geometry(
                &Info {
                    size,
                    object_size: 4 << 20,
                },
                false,
                4096,
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(error(0), "the image is empty");
        assert_eq!(
            error(1 << 20 | 512),
            "the image's size 1049088 is not a multiple of the block size 4096"
        );
    }
}
