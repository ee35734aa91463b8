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
