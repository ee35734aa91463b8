//! `FdChannel` over a SOCK_SEQPACKET socketpair: one message per read, one
//! reply per gathered write, and the end of the peer ends the channel.

use std::io::IoSlice;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_blk::proto::abi::{self, opcode};
use fuse_blk::proto::client::{encode_request, parse_reply};
use fuse_blk::{
    BlockDevice, Channel, FdChannel, Geometry, ReplyData, ReplySink, ReplyWrite, Request, Session,
    SessionConfig,
};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use zerocopy::IntoBytes;

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

#[test]
fn receive_and_send() {
    let (ours, peer) = pair();
    let channel = FdChannel::new(ours);
    nix::unistd::write(&peer, b"first message").unwrap();
    nix::unistd::write(&peer, b"second").unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(channel.receive(&mut buf).unwrap(), Some(13));
    assert_eq!(&buf[..13], b"first message");
    assert_eq!(channel.receive(&mut buf).unwrap(), Some(6));
    assert_eq!(&buf[..6], b"second");

    channel
        .send(&[IoSlice::new(b"ab"), IoSlice::new(b""), IoSlice::new(b"cd")])
        .unwrap();
    channel.send_reply(&[IoSlice::new(b"xyz")]);
    let mut reply = [0u8; 16];
    assert_eq!(nix::unistd::read(&peer, &mut reply).unwrap(), 4);
    assert_eq!(&reply[..4], b"abcd");
    assert_eq!(nix::unistd::read(&peer, &mut reply).unwrap(), 3);
    assert_eq!(&reply[..3], b"xyz");

    drop(peer);
    assert_eq!(channel.receive(&mut buf).unwrap(), None);
    // Sending to a gone peer fails; send_reply only logs.
    assert!(channel.send(&[IoSlice::new(b"late")]).is_err());
    channel.send_reply(&[IoSlice::new(b"late")]);
}

struct Zeros {
    destroyed: AtomicUsize,
}

impl BlockDevice for Zeros {
    fn geometry(&self) -> Geometry {
        Geometry::new(1 << 20, 512)
    }
    fn read(&self, _req: &Request, _offset: u64, len: u32, reply: ReplyData) {
        reply.data(&vec![0; len as usize]);
    }
    fn write(&self, _req: &Request, _offset: u64, _data: &[u8], _fua: bool, reply: ReplyWrite) {
        reply.ok();
    }
    fn destroy(&self) {
        self.destroyed.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn serve_over_a_socket_until_the_peer_closes() {
    let (ours, peer) = pair();
    let device = Arc::new(Zeros {
        destroyed: AtomicUsize::new(0),
    });
    let session = Arc::new(Session::new(device.clone(), SessionConfig::default()).unwrap());
    let read = abi::ReadIn {
        offset: 512,
        size: 1024,
        ..Default::default()
    };
    nix::unistd::write(
        &peer,
        &encode_request(opcode::READ, 7, 2, &[read.as_bytes()]),
    )
    .unwrap();
    let server = {
        let session = session.clone();
        std::thread::spawn(move || {
            session.serve(vec![Arc::new(FdChannel::new(ours)) as Arc<dyn Channel>])
        })
    };
    let mut reply = vec![0u8; 4096];
    let n = nix::unistd::read(&peer, &mut reply).unwrap();
    let parsed = parse_reply(&reply[..n]).unwrap();
    assert_eq!(parsed.unique, 7);
    assert_eq!(parsed.result, Ok(&[0u8; 1024][..]));
    drop(peer);
    server.join().unwrap().unwrap();
    assert_eq!(device.destroyed.load(Ordering::SeqCst), 1);
}

/// The disposition of SIGUSR1 in this process.
fn sigusr1_handler() -> libc::sighandler_t {
    // SAFETY: sigaction only reads the current action into a zeroed local.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, std::ptr::null(), &mut action),
            0
        );
        action.sa_sigaction
    }
}

#[test]
fn stop_ends_every_waiting_worker_without_a_signal() {
    let (ours, peers): (Vec<_>, Vec<_>) = (0..3).map(|_| pair()).unzip();
    let device = Arc::new(Zeros {
        destroyed: AtomicUsize::new(0),
    });
    let session = Arc::new(Session::new(device.clone(), SessionConfig::default()).unwrap());
    let server = {
        let session = session.clone();
        let channels = ours
            .into_iter()
            .map(|fd| Arc::new(FdChannel::new(fd)) as Arc<dyn Channel>)
            .collect();
        std::thread::spawn(move || session.serve(channels))
    };
    // Every worker answers a request, then waits for the next.
    let read = abi::ReadIn {
        size: 512,
        ..Default::default()
    };
    for (unique, peer) in (1..).zip(&peers) {
        nix::unistd::write(
            peer,
            &encode_request(opcode::READ, unique, 2, &[read.as_bytes()]),
        )
        .unwrap();
        let mut reply = vec![0u8; 4096];
        let n = nix::unistd::read(peer, &mut reply).unwrap();
        assert_eq!(parse_reply(&reply[..n]).unwrap().unique, unique);
    }
    while session.workers_waiting() < peers.len() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.is_finished() {
        assert!(Instant::now() < deadline, "the workers did not stop");
        session.stop();
        std::thread::sleep(Duration::from_millis(5));
    }
    server.join().unwrap().unwrap();
    assert_eq!(device.destroyed.load(Ordering::SeqCst), 1);
    // A library must not take a process-wide signal.
    assert_eq!(sigusr1_handler(), libc::SIG_DFL);
}

/// Times the calling thread has slept (voluntary context switches).
fn sleeps_of_this_thread() -> i64 {
    // SAFETY: getrusage only writes the zeroed local it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
        usage.ru_nvcsw
    }
}

/// Workers on descriptors of one open file share its one wait queue, as
/// workers on clones of one `/dev/fuse` connection share the connection's.
/// Requests sent one at a time must each wake one idle worker: were every
/// idle worker woken, each would go back to sleep once another had read
/// the request, about WORKERS sleeps per request in all (measured: 7.5 to
/// 8 with poll(2)) where one worker's is about one (1.0 to 1.1).
#[test]
fn a_request_wakes_one_of_the_idle_workers_of_a_shared_queue() {
    const WORKERS: u16 = 8;
    const REQUESTS: u64 = 200;
    let (ours, peer) = pair();
    let device = Arc::new(Zeros {
        destroyed: AtomicUsize::new(0),
    });
    let session = Arc::new(Session::new(device, SessionConfig::default()).unwrap());
    let workers: Vec<_> = (0..WORKERS)
        .map(|queue| {
            let channel = Arc::new(FdChannel::new_shared(ours.try_clone().unwrap()));
            let session = session.clone();
            std::thread::spawn(move || {
                let before = sleeps_of_this_thread();
                session.run_worker(queue, channel).unwrap();
                sleeps_of_this_thread() - before
            })
        })
        .collect();
    drop(ours);
    while session.workers_waiting() < usize::from(WORKERS) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let read = abi::ReadIn {
        size: 512,
        ..Default::default()
    };
    let mut reply = vec![0u8; 4096];
    for unique in 1..=REQUESTS {
        nix::unistd::write(
            &peer,
            &encode_request(opcode::READ, unique, 2, &[read.as_bytes()]),
        )
        .unwrap();
        let n = nix::unistd::read(&peer, &mut reply).unwrap();
        assert_eq!(parse_reply(&reply[..n]).unwrap().unique, unique);
    }
    // The end of the peer wakes every worker, and each leaves.
    drop(peer);
    let sleeps: i64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    // Each worker sleeps a few times more as it starts and ends.
    assert!(
        sleeps < 3 * REQUESTS as i64,
        "{WORKERS} workers slept {sleeps} times for {REQUESTS} requests: \
         a request woke more than one of them"
    );
    eprintln!("{WORKERS} workers slept {sleeps} times for {REQUESTS} requests");
}

/// A shared channel keeps the stop it waits with registered between waits;
/// a new stop ends its waits too, even one that took the old one's
/// descriptor number (closing that took the registration with it).
#[test]
fn a_shared_channel_waited_on_with_a_new_stop_is_stopped_by_it() {
    use std::os::fd::{AsFd, AsRawFd};
    let (ours, peer) = pair();
    let channel = FdChannel::new_shared(ours);
    let first = fuse_blk::Stop::new().unwrap();
    let number = first.as_fd().as_raw_fd();
    assert!(!channel
        .wait_ready(Duration::from_millis(1), &first)
        .unwrap());
    drop(first);
    // Usually the same number (unless a test running beside this one took
    // it first), so the channel cannot tell the stops apart by theirs.
    let second = fuse_blk::Stop::new().unwrap();
    if second.as_fd().as_raw_fd() != number {
        eprintln!("the stop's descriptor number was not reused");
    }
    second.set();
    let start = Instant::now();
    let waited = channel.wait_ready(Duration::from_secs(5), &second);
    assert_eq!(
        waited.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::Interrupted)
    );
    assert!(start.elapsed() < Duration::from_secs(1));
    // And a request still ends a wait.
    let mut buf = [0u8; 8];
    let third = fuse_blk::Stop::new().unwrap();
    nix::unistd::write(&peer, b"go").unwrap();
    assert_eq!(channel.receive_or_stop(&mut buf, &third).unwrap(), Some(2));
}

/// A worker holding large buffers waits for its next request for a bounded
/// time, also when the request that made the channel ready was read by
/// another worker first: it does not wait on, buffers resident, until the
/// next request comes (seen on the stock path with several workers).
#[test]
fn an_idle_wait_ends_though_another_reader_took_the_request() {
    let (ours, peer) = pair();
    let channel = FdChannel::new_shared(ours);
    let stop = fuse_blk::Stop::new().unwrap();
    let mut buf = [0u8; 8];
    nix::unistd::write(&peer, b"go").unwrap();
    assert!(channel.wait_ready(Duration::from_secs(5), &stop).unwrap());
    // Another worker reads it first.
    assert_eq!(channel.receive(&mut buf).unwrap(), Some(2));
    let idle = Duration::from_millis(300);
    let start = Instant::now();
    let waited = channel.receive_or_idle(&mut buf, &stop, idle);
    assert_eq!(
        waited.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::TimedOut)
    );
    // poll(2) and epoll_wait(2) count in whole milliseconds.
    assert!(
        start.elapsed() >= idle - Duration::from_millis(2),
        "{:?}",
        start.elapsed()
    );
    // A request that comes within the wait is read.
    nix::unistd::write(&peer, b"on").unwrap();
    assert_eq!(
        channel
            .receive_or_idle(&mut buf, &stop, Duration::from_secs(30))
            .unwrap(),
        Some(2)
    );
}
