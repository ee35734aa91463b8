//! The device against real servers: nbdkit's memory and file plugins,
//! its error, delay, blocksize-policy and exportname filters, and
//! qemu-nbd, each started by the test on a unix socket. Requests go
//! through the session engine (the backends' test harness) as the kernel
//! would send them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fuse_blk::Features;
use fuse_blk_backends::testutil::{pattern, Harness};
use fuse_blk_nbd::testutil::Server;
use fuse_blk_nbd::{LinkStatus, NbdDevice, Options, ReconnectPolicy};

/// Far above anything these tests wait for, far below a hang.
const NO_HANG: Duration = Duration::from_secs(60);

fn options(timeout: Duration) -> Options {
    Options {
        reconnect: ReconnectPolicy {
            timeout,
            first_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(100),
            ..ReconnectPolicy::default()
        },
        ..Options::new(false, 512)
    }
}

fn connect(uri: &str, options: &Options) -> (Arc<NbdDevice>, Harness) {
    let device = Arc::new(NbdDevice::connect(uri, options).unwrap_or_else(|e| panic!("{e}")));
    let harness = Harness::new(device.clone());
    (device, harness)
}

fn image(dir: &std::path::Path, size: u64) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

#[test]
fn memory_export_serves_every_operation() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(dir.path(), &["memory", "size=16M"]);
    let (device, harness) = connect(&server.uri(""), &options(NO_HANG));
    let geometry = harness.geometry();
    assert_eq!(geometry.size, 16 << 20);
    assert!(!geometry.read_only);
    assert_eq!(geometry.features, Features::ALL);
    assert!(device.export().can_multi_conn);

    let data = pattern(1, 64 << 10);
    harness.write(1 << 20, &data, false).unwrap();
    harness.write(2 << 20, &data, true).unwrap();
    harness.flush().unwrap();
    assert_eq!(harness.read(1 << 20, 64 << 10).unwrap(), data);
    assert_eq!(harness.read(2 << 20, 64 << 10).unwrap(), data);
    // Unwritten blocks of the memory plugin read as zeros.
    assert_eq!(harness.read(0, 4096).unwrap(), vec![0; 4096]);

    // Zeroes keeping the storage, zeroes that may release it, a discard.
    harness.write_zeroes(1 << 20, 4096, false).unwrap();
    harness.write_zeroes((1 << 20) + 8192, 4096, true).unwrap();
    harness.discard(2 << 20, 64 << 10).unwrap();
    let back = harness.read(1 << 20, 64 << 10).unwrap();
    assert_eq!(&back[..4096], &[0; 4096][..]);
    assert_eq!(&back[4096..8192], &data[4096..8192]);
    assert_eq!(&back[8192..12288], &[0; 4096][..]);
    assert_eq!(&back[12288..], &data[12288..]);
    assert_eq!(harness.read(2 << 20, 64 << 10).unwrap(), vec![0; 64 << 10]);
    assert_eq!(device.reconnections(), 0);
}

#[test]
fn requests_larger_than_the_servers_maximum_are_split() {
    let dir = tempfile::tempdir().unwrap();
    // The policy filter advertises a 64 KiB maximum and fails anything
    // larger with EINVAL, so only split requests succeed.
    let server = Server::nbdkit(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=8M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let (device, harness) = connect(&server.uri(""), &options(NO_HANG));
    assert_eq!(device.export().maximum_block, 65536);
    assert_eq!(harness.geometry().physical_block_size, 4096);
    let data = pattern(7, 1 << 20);
    harness.write(512, &data, false).unwrap();
    assert_eq!(harness.read(512, 1 << 20).unwrap(), data);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(dir.path(), &["--readonly", "memory", "size=1M"]);
    let (_device, harness) = connect(&server.uri(""), &options(NO_HANG));
    let geometry = harness.geometry();
    assert!(geometry.read_only);
    assert!(!geometry.features.write_zeroes && !geometry.features.discard);
    assert_eq!(harness.write(0, &[1; 512], false), Err(libc::EROFS));
    assert_eq!(harness.read(0, 512).unwrap(), vec![0; 512]);
}

#[test]
fn server_errors_reach_the_caller_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(
        dir.path(),
        &[
            "--filter=error",
            "memory",
            "size=1M",
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let (device, harness) = connect(&server.uri(""), &options(NO_HANG));
    let start = Instant::now();
    assert_eq!(harness.write(0, &[1; 4096], false), Err(libc::ENOSPC));
    assert_eq!(harness.read(0, 4096), Err(libc::EIO));
    // Not errors of the connection: nothing waited for a reconnection.
    assert!(start.elapsed() < NO_HANG / 2, "took {:?}", start.elapsed());
    assert_eq!(device.status(), LinkStatus::Connected);
    assert_eq!(device.reconnections(), 0);
    // The connection still serves what the filter lets through.
    harness.flush().unwrap();
    harness.write_zeroes(0, 4096, false).unwrap();
}

/// A read in flight when the server is killed waits, and is answered with
/// the right data once the server is back.
#[test]
fn request_in_flight_when_the_server_dies_is_reissued() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 4 << 20);
    let data = pattern(3, 4096);
    std::fs::write(dir.path().join("data"), &data).unwrap();
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&data, 8192)
            .unwrap();
    }
    // Every read takes 2 s at the server, so the one below is surely in
    // flight when the server dies.
    let mut server = Server::nbdkit(
        dir.path(),
        &["--filter=delay", "file", path.to_str().unwrap(), "rdelay=2"],
    );
    let (device, harness) = connect(&server.uri(""), &options(NO_HANG));
    let harness = Arc::new(harness);
    let reader = {
        let harness = harness.clone();
        thread::spawn(move || harness.read(8192, 4096))
    };
    thread::sleep(Duration::from_millis(300));
    server.kill();
    thread::sleep(Duration::from_millis(300));
    assert!(
        !reader.is_finished(),
        "the read ended while the server was down"
    );
    assert!(matches!(device.status(), LinkStatus::Reconnecting { .. }));
    server.restart();
    assert_eq!(reader.join().unwrap().unwrap(), data);
    assert_eq!(device.reconnections(), 1);
    assert_eq!(device.status(), LinkStatus::Connected);
}

/// Writes and reads never stop while the server (file plugin, so the data
/// persists) is killed and restarted: every request is answered
/// correctly, and the image holds what was written.
#[test]
fn server_restarts_under_a_stream_of_io_lose_nothing() {
    const WORKERS: usize = 3;
    const REGION: u64 = 2 << 20;
    const BLOCK: usize = 16 << 10;
    const RESTARTS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), WORKERS as u64 * REGION);
    // Writes take a moment at the server, so some are in flight at the
    // kill.
    let mut server = Server::nbdkit(
        dir.path(),
        &[
            "--filter=delay",
            "file",
            path.to_str().unwrap(),
            "wdelay=5ms",
        ],
    );
    let (device, harness) = connect(&server.uri(""), &options(NO_HANG));
    let harness = Arc::new(harness);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let (harness, stop, done) = (harness.clone(), stop.clone(), done.clone());
            thread::spawn(move || {
                let blocks = (REGION as usize) / BLOCK;
                let base = worker as u64 * REGION;
                let mut written: Vec<Option<u64>> = vec![None; blocks];
                let mut errors = Vec::new();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = (round as usize * 7) % blocks;
                    let offset = base + (block * BLOCK) as u64;
                    let seed = (worker as u64) << 32 | round;
                    let data = pattern(seed, BLOCK);
                    if let Err(e) = harness.write(offset, &data, round % 5 == 0) {
                        errors.push(format!("write at {offset}: errno {e}"));
                    } else {
                        written[block] = Some(seed);
                    }
                    match harness.read(offset, BLOCK as u32) {
                        Ok(back) if back == data => {}
                        Ok(_) => errors.push(format!("read at {offset}: wrong data")),
                        Err(e) => errors.push(format!("read at {offset}: errno {e}")),
                    }
                    if round % 16 == 0 {
                        if let Err(e) = harness.flush() {
                            errors.push(format!("flush: errno {e}"));
                        }
                    }
                    round += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                (written, errors)
            })
        })
        .collect();

    let wait_for_progress = |count: u64| {
        let start = done.load(Ordering::Relaxed);
        let since = Instant::now();
        while done.load(Ordering::Relaxed) < start + count {
            assert!(since.elapsed() < NO_HANG, "no progress in {NO_HANG:?}");
            thread::sleep(Duration::from_millis(10));
        }
    };
    for _ in 0..RESTARTS {
        wait_for_progress(20);
        server.kill();
        thread::sleep(Duration::from_millis(200));
        server.restart();
    }
    wait_for_progress(20);
    stop.store(true, Ordering::Relaxed);

    let results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let image = std::fs::read(&path).unwrap();
    for (worker, (written, errors)) in results.into_iter().enumerate() {
        assert!(errors.is_empty(), "worker {worker}: {errors:?}");
        for (block, seed) in written.iter().enumerate() {
            let offset = worker * REGION as usize + block * BLOCK;
            let expected = seed.map_or(vec![0; BLOCK], |seed| pattern(seed, BLOCK));
            assert!(
                image[offset..offset + BLOCK] == expected[..],
                "worker {worker}: block {block} of the image differs"
            );
        }
    }
    // Each kill broke the connection once, and each restart mended it.
    assert_eq!(device.reconnections(), RESTARTS);
    assert_eq!(device.status(), LinkStatus::Connected);
}

#[test]
fn requests_fail_with_eio_after_the_timeout_and_recover_with_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(500);
    let mut server = Server::nbdkit(dir.path(), &["memory", "size=1M"]);
    let (device, harness) = connect(&server.uri(""), &options(timeout));
    harness.read(0, 512).unwrap();
    // The timeout counts from when the link sees the connection break,
    // which is after the kill began: the link notices it by itself.
    let start = Instant::now();
    server.kill();

    assert_eq!(harness.read(0, 512), Err(libc::EIO));
    let waited = start.elapsed();
    assert!(
        waited >= timeout,
        "failed after {waited:?}, before the timeout"
    );
    assert!(waited < NO_HANG, "took {waited:?}");
    assert!(matches!(device.status(), LinkStatus::Down { .. }));
    assert!(device.status().to_string().starts_with("down for "));
    // Once down, requests do not wait again: flush (what detach sends)
    // fails without a new timeout.
    let start = Instant::now();
    assert_eq!(harness.flush(), Err(libc::EIO));
    assert_eq!(harness.write(0, &[1; 512], false), Err(libc::EIO));
    assert!(start.elapsed() < NO_HANG, "took {:?}", start.elapsed());

    // The server back, the device serves again (after the backoff).
    server.restart();
    let since = Instant::now();
    loop {
        match harness.write(0, &[2; 512], false) {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e, libc::EIO);
                assert!(since.elapsed() < NO_HANG, "no reconnection in {NO_HANG:?}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert_eq!(harness.read(0, 512).unwrap(), vec![2; 512]);
    assert_eq!(device.status(), LinkStatus::Connected);
    assert_eq!(device.status().to_string(), "connected");
}

#[test]
fn a_server_of_another_size_is_not_reconnected_to() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(300);
    let (device, harness) = {
        let server = Server::nbdkit(dir.path(), &["memory", "size=1M"]);
        let connected = connect(&server.uri(""), &options(timeout));
        drop(server);
        connected
    };
    let _other = Server::nbdkit(dir.path(), &["memory", "size=2M"]);
    assert_eq!(harness.read(0, 512), Err(libc::EIO));
    assert!(matches!(device.status(), LinkStatus::Down { .. }));
    assert_eq!(device.reconnections(), 0);
}

#[test]
fn multi_conn_opens_a_connection_per_queue_only_where_the_server_allows() {
    let dir = tempfile::tempdir().unwrap();
    let four = Options {
        connections: 4,
        ..options(NO_HANG)
    };
    let server = Server::nbdkit(dir.path(), &["memory", "size=1M"]);
    let (device, harness) = connect(&server.uri(""), &four);
    assert_eq!(device.connections(), 4);
    harness.write(0, &[5; 512], false).unwrap();
    assert_eq!(harness.read(0, 512).unwrap(), vec![5; 512]);
    drop(server);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(
        dir.path(),
        &[
            "--filter=multi-conn",
            "memory",
            "size=1M",
            "multi-conn-mode=disable",
        ],
    );
    let (device, _harness) = connect(&server.uri(""), &four);
    assert!(!device.export().can_multi_conn);
    assert_eq!(device.connections(), 1);
}

#[test]
fn qemu_nbd_export() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 4 << 20);
    let server = Server::qemu_nbd(dir.path(), &path, "disk", &["--cache=none"]);
    let (_device, harness) = connect(&server.uri("disk"), &options(NO_HANG));
    assert_eq!(harness.geometry().size, 4 << 20);
    let data = pattern(9, 128 << 10);
    harness.write(4096, &data, true).unwrap();
    harness.flush().unwrap();
    assert_eq!(harness.read(4096, 128 << 10).unwrap(), data);
    harness.write_zeroes(4096, 4096, false).unwrap();
    assert_eq!(harness.read(4096, 4096).unwrap(), vec![0; 4096]);
    let image = std::fs::read(&path).unwrap();
    assert_eq!(&image[8192..4096 + (128 << 10)], &data[4096..]);
}

fn connect_error(uri: &str) -> String {
    match NbdDevice::connect(uri, &options(NO_HANG)) {
        Ok(_) => panic!("{uri}: connected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_one_line_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!(
        "nbd+unix:///disk?socket={}",
        dir.path().join("nobody.sock").display()
    );
    let message = connect_error(&nobody);
    assert!(
        message.starts_with(&format!("{nobody}: "))
            && message.contains("No such file or directory"),
        "{message}"
    );

    let server = Server::nbdkit(
        dir.path(),
        &[
            "--filter=exportname",
            "memory",
            "size=1M",
            "exportname=disk",
            "exportname-strict=true",
        ],
    );
    NbdDevice::connect(&server.uri("disk"), &options(NO_HANG)).unwrap();
    let unknown = server.uri("other");
    let message = connect_error(&unknown);
    assert!(message.starts_with(&format!("{unknown}: ")), "{message}");
    assert!(message.contains("other"), "{message}");

    assert_eq!(
        connect_error("nbd+unix:///disk"),
        "nbd+unix:///disk: no socket: expected nbd+unix:///EXPORT?socket=PATH"
    );
    let message = connect_error("nbd://127.0.0.1:1/disk");
    assert!(message.contains("Connection refused"), "{message}");
    for message in [message, connect_error(&unknown), connect_error(&nobody)] {
        assert_eq!(message.lines().count(), 1, "{message}");
    }
}

/// TLS with a pre-shared key, through libnbd's URI parameters: served,
/// reconnected after a kill, and refused with a reason when the key's
/// user is unknown or the client does not speak TLS.
#[test]
fn tls_with_a_pre_shared_key() {
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("keys.psk");
    std::fs::write(&psk, "alice:0123456789abcdef0123456789abcdef\n").unwrap();
    let psk_arg = format!("--tls-psk={}", psk.display());
    let mut server = Server::nbdkit(
        dir.path(),
        &["--tls=require", &psk_arg, "memory", "size=1M"],
    );
    let socket = server.socket().display().to_string();
    let tls_uri = |user: &str| {
        format!(
            "nbds+unix://{user}@/?socket={socket}&tls-psk-file={}",
            psk.display()
        )
    };
    let (device, harness) = connect(&tls_uri("alice"), &options(NO_HANG));
    harness.write(0, &[7; 4096], false).unwrap();
    server.restart();
    assert_eq!(harness.read(0, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(device.reconnections(), 1);

    let message = connect_error(&tls_uri("bob"));
    assert!(message.contains("username bob was not found"), "{message}");
    let message = connect_error(&server.uri(""));
    assert!(message.contains("server requires TLS"), "{message}");
}

/// The device going away does not wait for a server that stopped
/// answering: the disconnect is sent, not waited for.
#[test]
fn destroy_does_not_wait_for_a_stopped_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(dir.path(), &["memory", "size=1M"]);
    let (device, harness) = connect(&server.uri(""), &options(NO_HANG));
    harness.write(0, &[1; 512], false).unwrap();
    server.pause();
    let destroying = {
        let device = device.clone();
        thread::spawn(move || fuse_blk::BlockDevice::destroy(&*device))
    };
    let start = Instant::now();
    while !destroying.is_finished() {
        if start.elapsed() > NO_HANG / 2 {
            server.resume();
            panic!("destroy waited {:?} for a stopped server", start.elapsed());
        }
        thread::sleep(Duration::from_millis(10));
    }
    destroying.join().unwrap();
    server.resume();
}

/// Many commands in flight on one connection: 16 reads that each take
/// 200 ms at the server finish together, far sooner than one after the
/// other (3.2 s).
#[test]
fn one_connection_carries_many_commands_at_once() {
    const READS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(
        dir.path(),
        &["--filter=delay", "memory", "size=16M", "delay-read=200ms"],
    );
    let single = Options {
        connections: 1,
        ..options(NO_HANG)
    };
    let (device, harness) = connect(&server.uri(""), &single);
    assert_eq!(device.connections(), 1);
    let data = pattern(11, READS * 4096);
    harness.write(0, &data, false).unwrap();
    let harness = Arc::new(harness);
    let start = Instant::now();
    let readers: Vec<_> = (0..READS)
        .map(|i| {
            let harness = harness.clone();
            thread::spawn(move || harness.read(i as u64 * 4096, 4096))
        })
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let back = reader.join().unwrap().unwrap();
        assert!(
            back == data[i * 4096..(i + 1) * 4096],
            "read {i}: wrong data"
        );
    }
    let took = start.elapsed();
    // One at a time they take 3.2 s; together 0.2 s and what a busy
    // machine adds. Half the serial time leaves room for that.
    assert!(
        took < Duration::from_millis(200) * READS as u32 / 2,
        "{READS} reads of 200 ms took {took:?}: not in flight together"
    );
    assert_eq!(device.reconnections(), 0);
}

/// The cap on commands in flight holds: with at most 2 on the
/// connection, 8 reads of 200 ms take at least 4 rounds.
#[test]
fn commands_in_flight_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(
        dir.path(),
        &["--filter=delay", "memory", "size=1M", "delay-read=200ms"],
    );
    let capped = Options {
        connections: 1,
        max_in_flight: 2,
        ..options(NO_HANG)
    };
    let (_device, harness) = connect(&server.uri(""), &capped);
    let harness = Arc::new(harness);
    let start = Instant::now();
    let readers: Vec<_> = (0..8u64)
        .map(|i| {
            let harness = harness.clone();
            thread::spawn(move || harness.read(i * 4096, 4096))
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.join().unwrap().unwrap(), vec![0; 4096]);
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(800), "took {took:?}");
}

/// A server that keeps the connection but stops answering (SIGSTOP): the
/// command timeout drops the connection and the read is issued again on
/// a new one, answered once the server runs again, with the right data.
#[test]
fn unanswered_command_times_out_and_is_reissued() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(dir.path(), &["memory", "size=1M"]);
    let patient = Options {
        reconnect: ReconnectPolicy {
            command_timeout: Duration::from_millis(300),
            ..options(NO_HANG).reconnect
        },
        ..options(NO_HANG)
    };
    let (device, harness) = connect(&server.uri(""), &patient);
    let data = pattern(5, 4096);
    harness.write(4096, &data, false).unwrap();
    let harness = Arc::new(harness);
    server.pause();
    let reader = {
        let harness = harness.clone();
        thread::spawn(move || harness.read(4096, 4096))
    };
    // Past the command timeout: the connection was given up.
    let since = Instant::now();
    while !matches!(device.status(), LinkStatus::Reconnecting { .. }) {
        if since.elapsed() > NO_HANG {
            server.resume();
            panic!("the stopped server's connection was never given up");
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !reader.is_finished(),
        "the read ended while the server was stopped"
    );
    server.resume();
    assert_eq!(reader.join().unwrap().unwrap(), data);
    assert!(device.reconnections() >= 1);
    assert_eq!(device.status(), LinkStatus::Connected);
}

/// A stopped server with a short reconnect timeout: the command times
/// out, the reconnection attempts (whose handshakes it never answers)
/// time out too, and the read fails with EIO instead of hanging.
#[test]
fn stopped_server_fails_requests_with_eio_never_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::nbdkit(dir.path(), &["memory", "size=1M"]);
    let impatient = Options {
        reconnect: ReconnectPolicy {
            timeout: Duration::from_millis(500),
            command_timeout: Duration::from_millis(300),
            ..options(NO_HANG).reconnect
        },
        ..options(NO_HANG)
    };
    let (device, harness) = connect(&server.uri(""), &impatient);
    harness.read(0, 512).unwrap();
    server.pause();
    let start = Instant::now();
    let result = harness.read(0, 512);
    let took = start.elapsed();
    server.resume();
    assert_eq!(result, Err(libc::EIO));
    // The command timeout, then the reconnect timeout, then at most one
    // handshake's limit: nowhere near a hang.
    assert!(took >= Duration::from_millis(800), "failed after {took:?}");
    assert!(took < NO_HANG / 4, "took {took:?}");
    // The server back, so is the device.
    let since = Instant::now();
    while harness.read(0, 512).is_err() {
        assert!(since.elapsed() < NO_HANG, "no reconnection in {NO_HANG:?}");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(device.reconnections() >= 1);
}
