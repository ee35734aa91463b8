//! `fuse-blk stats` against real devices on the stock path: known I/O
//! with dd shows up in `--json` with exact counts where the loop driver
//! passes requests one to one, the Prometheus output is well formed and
//! agrees, the textfile is replaced atomically, and bad input or a daemon
//! that does not answer gets a one-line error.
//!
//! With `LO_FLAGS_DIRECT_IO` the loop driver turns each request into one
//! direct I/O on the FUSE file, which FUSE sends as one READ or WRITE up
//! to `max_write` (1 MiB): dd with O_DIRECT, one request at a time, of
//! block-aligned sizes up to 64 KiB, arrives exactly as issued. Discards
//! may be split by the block layer (max_discard_sectors), flushes come
//! from the kernel as it sees fit (fsync, the last close): those are
//! checked by bytes, or as at least one.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_blk_tests::{sh, Instance, TempDir};
use serde_json::Value;

/// The device's report of one `stats NAME --json`.
fn stats_json(instance: &Instance, name: &str) -> Value {
    let out = instance.run(["stats", name, "--json"]);
    assert!(
        out.status.success(),
        "stats --json failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text.lines().count(), 1, "one line per report: {text}");
    let reports: Vec<Value> = serde_json::from_str(&text).expect("stats --json is JSON");
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(reports[0]["name"], name);
    reports.into_iter().next().unwrap()
}

/// `(ops, bytes)` of one kind in a report's totals.
fn counts(report: &Value, kind: &str) -> (u64, u64) {
    let counts = &report["total"]["requests"][kind];
    (
        counts["ops"].as_u64().expect("ops"),
        counts["bytes"].as_u64().expect("bytes"),
    )
}

/// Counts of one kind between two reports.
fn delta(before: &Value, after: &Value, kind: &str) -> (u64, u64) {
    let (ops0, bytes0) = counts(before, kind);
    let (ops1, bytes1) = counts(after, kind);
    (ops1 - ops0, bytes1 - bytes0)
}

fn dd(args: &[&str]) {
    let mut full = vec!["status=none"];
    full.extend_from_slice(args);
    sh("dd", &full);
}

/// Whether udev runs here: it reads a device after a writer closes it
/// (blkid), which would add reads the test did not make.
fn settle_udev() {
    if Path::new("/run/udev/control").exists() {
        let _ = Command::new("udevadm")
            .args(["settle", "--timeout=10"])
            .status();
    }
}

#[test]
fn known_io_is_counted_exactly() {
    let instance = Instance::new("stats-io");
    let device = instance.attach(&[
        "--transport",
        "loop",
        "--block-size",
        "4096",
        "--name",
        "counted",
        "mem:64M",
    ]);
    let dev = device.path_str().to_owned();
    settle_udev();
    let start = stats_json(&instance, "counted");
    assert_eq!(start["device"], dev.as_str());
    assert_eq!(start["in_flight"], 0);

    // Reads first: nothing else opened the device for writing yet, so
    // nothing (udev) has a reason to read it meanwhile.
    dd(&[
        &format!("if={dev}"),
        "of=/dev/null",
        "bs=4096",
        "count=37",
        "iflag=direct",
    ]);
    dd(&[
        &format!("if={dev}"),
        "of=/dev/null",
        "bs=64K",
        "count=5",
        "skip=10",
        "iflag=direct",
    ]);
    let after_reads = stats_json(&instance, "counted");
    assert_eq!(
        delta(&start, &after_reads, "read"),
        (37 + 5, 37 * 4096 + 5 * 65536)
    );
    assert_eq!(delta(&start, &after_reads, "write"), (0, 0));

    dd(&[
        "if=/dev/zero",
        &format!("of={dev}"),
        "bs=4096",
        "count=100",
        "oflag=direct",
        "conv=notrunc",
    ]);
    dd(&[
        "if=/dev/zero",
        &format!("of={dev}"),
        "bs=64K",
        "count=7",
        "seek=20",
        "oflag=direct",
        "conv=notrunc,fsync",
    ]);
    let after_writes = stats_json(&instance, "counted");
    assert_eq!(
        delta(&after_reads, &after_writes, "write"),
        (100 + 7, 100 * 4096 + 7 * 65536)
    );
    // conv=fsync flushes the device: at least that one (the last close of
    // a writer may add its own).
    let (flushes, _) = delta(&after_reads, &after_writes, "flush");
    assert!(flushes >= 1, "{flushes} flushes after fsync");

    // A discard may be split by the block layer: its bytes add up exactly.
    sh("blkdiscard", &["-o", "0", "-l", "1M", &dev]);
    settle_udev();
    let after_discard = stats_json(&instance, "counted");
    let (discards, discarded) = delta(&after_writes, &after_discard, "discard");
    assert!(discards >= 1, "no discard counted");
    assert_eq!(discarded, 1 << 20);

    // BLKZEROOUT without unmapping: ZERO_RANGE on the FUSE file.
    sh("blkdiscard", &["-z", "-o", "1M", "-l", "512K", &dev]);
    settle_udev();
    let end = stats_json(&instance, "counted");
    let (zeroes, zeroed) = delta(&after_discard, &end, "write_zeroes");
    assert!(zeroes >= 1, "no write-zeroes counted");
    assert_eq!(zeroed, 512 << 10);

    // Only an NBD backend reports its reconnections.
    assert_eq!(end["total"].get("backend_reconnections"), None);
    // Nothing failed, nothing is left in flight, and the service times
    // were measured: every answered request is in the histogram.
    assert_eq!(end["in_flight"], 0);
    let errors: u64 = end["total"]["errors"]
        .as_object()
        .expect("errors")
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(errors, 0, "{}", end["total"]["errors"]);
    let answered: u64 = ["read", "write", "flush", "discard", "write_zeroes"]
        .iter()
        .map(|kind| counts(&end, kind).0)
        .sum();
    let histogram: u64 = end["total"]["histogram"]
        .as_array()
        .expect("histogram")
        .iter()
        .map(|bucket| bucket[1].as_u64().unwrap())
        .sum();
    assert_eq!(histogram, answered);
    for percentile in ["p50", "p99", "p99.9"] {
        let us = end["service_us"][percentile]
            .as_f64()
            .unwrap_or_else(|| panic!("{percentile} missing: {}", end["service_us"]));
        assert!(us > 0.0, "{percentile} = {us}");
    }
    assert!(
        end["service_us"]["p50"].as_f64() <= end["service_us"]["p99.9"].as_f64(),
        "{}",
        end["service_us"]
    );

    // The table: a header and one row for the device.
    let out = instance.run(["stats"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[0].starts_with("NAME") && lines[0].contains("p99.9(us)"));
    assert!(lines[1].starts_with("counted "), "{table}");
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn interval_reports_rates_over_the_interval() {
    let instance = Instance::new("stats-interval");
    let device = instance.attach(&["--transport", "loop", "--name", "ticking", "mem:16M"]);
    let dev = device.path_str().to_owned();
    // Writes all through the run (about 1.5 s), in a thread of its own.
    let writer = std::thread::spawn(move || {
        for round in 0..15 {
            dd(&[
                "if=/dev/zero",
                &format!("of={dev}"),
                "bs=4096",
                "count=20",
                &format!("seek={}", round * 20),
                "oflag=direct",
                "conv=notrunc",
            ]);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let out = instance.run([
        "stats",
        "ticking",
        "--json",
        "--interval",
        "0.5",
        "--count",
        "3",
    ]);
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let reports: Vec<Value> = text
        .lines()
        .map(|line| {
            let mut devices: Vec<Value> = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(devices.len(), 1);
            devices.remove(0)
        })
        .collect();
    assert_eq!(reports.len(), 3, "{text}");
    for pair in reports.windows(2) {
        let (before, after) = (&pair[0], &pair[1]);
        // Each later report covers about one interval, measured by the
        // daemon between its answers (sleeps may run long on a busy
        // machine, and an answer may come late: only a loose bound).
        let interval = after["interval_s"].as_f64().unwrap();
        assert!(interval >= 0.2, "interval of {interval} s");
        // Its rate is the difference of the totals over that interval.
        let (writes, _) = delta(before, after, "write");
        let rate = after["ops_per_s"]["write"].as_f64().unwrap();
        let expected = writes as f64 / interval;
        assert!(
            (rate - expected).abs() <= 1e-6 * expected.max(1.0),
            "{rate} w/s against {writes} writes in {interval} s"
        );
    }
    device.detach();
    instance.assert_nothing_left();
}

/// One sample line of the text format: name, labels, value.
type PromSample = (String, BTreeMap<String, String>, f64);

/// Parses the Prometheus text exposition format strictly enough for our
/// output: every sample belongs to a family announced by HELP and TYPE
/// lines before it, label values are quoted with escapes, values are
/// numbers. Returns the samples and each family's type.
fn parse_prometheus(text: &str) -> (Vec<PromSample>, BTreeMap<String, String>) {
    assert!(text.ends_with('\n'), "ends with a newline");
    let mut types = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.is_empty(), "{line}");
            assert!(helped.insert(name.to_owned()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name type");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(helped.contains(name), "TYPE before HELP: {line}");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (name, rest) = line.split_at(
            line.find(['{', ' '])
                .unwrap_or_else(|| panic!("no value: {line}")),
        );
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name {name:?}"
        );
        let mut labels = BTreeMap::new();
        let value = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.chars();
            loop {
                let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "label name {key:?} in {line}"
                );
                assert_eq!(chars.next(), Some('"'), "quoted value in {line}");
                let mut value = String::new();
                loop {
                    match chars
                        .next()
                        .unwrap_or_else(|| panic!("unterminated: {line}"))
                    {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some(c @ ('\\' | '"')) => value.push(c),
                            other => panic!("bad escape {other:?} in {line}"),
                        },
                        c => value.push(c),
                    }
                }
                labels.insert(key, value);
                match chars.next() {
                    Some(',') => continue,
                    Some('}') => break,
                    other => panic!("{other:?} after a label in {line}"),
                }
            }
            chars.collect::<String>()
        } else {
            rest.to_owned()
        };
        let value = value
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("one space before the value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            number => number
                .parse()
                .unwrap_or_else(|_| panic!("value {number:?} in {line}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(name);
        let kind = types
            .get(family)
            .unwrap_or_else(|| panic!("sample before its TYPE: {line}"));
        if kind == "counter" {
            assert!(name.ends_with("_total"), "counter without _total: {name}");
        }
        samples.push((name.to_owned(), labels, value));
    }
    (samples, types)
}

#[test]
fn prometheus_output_is_well_formed_and_agrees_with_json() {
    let instance = Instance::new("stats-prom");
    let device = instance.attach(&["--transport", "loop", "--name", "scraped", "mem:16M"]);
    let dev = device.path_str().to_owned();
    dd(&[
        "if=/dev/zero",
        &format!("of={dev}"),
        "bs=4096",
        "count=25",
        "oflag=direct",
        "conv=notrunc",
    ]);
    let out = instance.run(["stats", "--prometheus"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (samples, types) = parse_prometheus(&text);
    assert_eq!(types["fuse_blk_requests_total"], "counter");
    assert_eq!(types["fuse_blk_in_flight"], "gauge");
    assert_eq!(types["fuse_blk_service_seconds"], "histogram");
    for (name, labels, _) in &samples {
        assert_eq!(
            labels.get("device").map(String::as_str),
            Some("scraped"),
            "{name} {labels:?}"
        );
    }
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        samples
            .iter()
            .find(|(n, labels, _)| {
                n == name && label.is_none_or(|(k, v)| labels.get(k).map(String::as_str) == Some(v))
            })
            .unwrap_or_else(|| panic!("{name} {label:?} missing"))
            .2
    };
    let json = stats_json(&instance, "scraped");
    let (writes, written) = counts(&json, "write");
    assert!(writes >= 25);
    assert_eq!(
        value("fuse_blk_requests_total", Some(("op", "write"))),
        writes as f64
    );
    assert_eq!(
        value("fuse_blk_bytes_total", Some(("op", "write"))),
        written as f64
    );
    assert_eq!(value("fuse_blk_in_flight", None), 0.0);
    // Histogram: buckets cumulative, ending in +Inf = _count = every
    // request answered.
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(name, _, _)| name == "fuse_blk_service_seconds_bucket")
        .map(|(_, labels, count)| {
            let le = match labels["le"].as_str() {
                "+Inf" => f64::INFINITY,
                bound => bound.parse().expect("le is a number"),
            };
            (le, *count)
        })
        .collect();
    assert!(buckets.len() > 2);
    for pair in buckets.windows(2) {
        assert!(pair[0].0 < pair[1].0, "bounds increase: {buckets:?}");
        assert!(pair[0].1 <= pair[1].1, "counts cumulative: {buckets:?}");
    }
    let (last_bound, last_count) = *buckets.last().unwrap();
    assert_eq!(last_bound, f64::INFINITY);
    let count = value("fuse_blk_service_seconds_count", None);
    assert_eq!(last_count, count);
    let answered: u64 = ["read", "write", "flush", "discard", "write_zeroes"]
        .iter()
        .map(|kind| counts(&json, kind).0)
        .sum();
    // The JSON was read after the scrape: at least as many.
    assert!(count >= 25.0 && count <= answered as f64, "{count}");
    assert!(value("fuse_blk_service_seconds_sum", None) > 0.0);
    device.detach();
    instance.assert_nothing_left();
}

#[test]
fn textfile_is_replaced_atomically() {
    let instance = Instance::new("stats-textfile");
    let device = instance.attach(&["--transport", "loop", "--name", "textfile", "mem:16M"]);
    let dir = TempDir::new("stats-textfile");
    let path = dir.join("fuse_blk.prom");
    let done = Arc::new(AtomicBool::new(false));
    // A reader that reads the file as fast as it can while it is being
    // rewritten: it must only ever see complete files.
    let reader = {
        let path = path.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !done.load(Ordering::Relaxed) {
                let Ok(text) = fs::read_to_string(&path) else {
                    continue; // not written yet
                };
                assert!(
                    text.ends_with('\n')
                        && text.contains("fuse_blk_service_seconds_count{device=\"textfile\"}"),
                    "a partial file: {text:?}"
                );
                parse_prometheus(&text);
                reads += 1;
            }
            reads
        })
    };
    let dev = device.path_str().to_owned();
    let stats = instance
        .command()
        .args(["stats", "--prometheus-file"])
        .arg(&path)
        .args(["--interval", "0.05", "--count", "40"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stats");
    let deadline = Instant::now() + Duration::from_secs(60);
    let first_inode = loop {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = fs::metadata(&path) {
            break meta.ino();
        }
        assert!(Instant::now() < deadline, "stats never wrote the file");
        std::thread::sleep(Duration::from_millis(10));
    };
    dd(&[
        "if=/dev/zero",
        &format!("of={dev}"),
        "bs=4096",
        "count=50",
        "oflag=direct",
        "conv=notrunc",
    ]);
    let out = stats.wait_with_output().expect("stats");
    done.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw only whole files");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "--prometheus-file alone prints nothing"
    );
    assert!(reads > 0, "the reader never read the file");
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        fs::metadata(&path).unwrap().ino(),
        first_inode,
        "each write is a new file renamed over the old"
    );
    // Only the file itself is left: no temporary file.
    let names: Vec<String> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["fuse_blk.prom"]);
    // The last write counted the writes.
    let (samples, _) = parse_prometheus(&fs::read_to_string(&path).unwrap());
    let writes = samples
        .iter()
        .find(|(name, labels, _)| name == "fuse_blk_requests_total" && labels["op"] == "write")
        .expect("writes")
        .2;
    assert!(writes >= 50.0, "{writes} writes");
    device.detach();
    instance.assert_nothing_left();
}

/// Runs a `stats` that must fail with one line on stderr; returns it.
fn stats_fails(instance: &Instance, args: &[&str], code: i32) -> String {
    let mut full = vec!["stats"];
    full.extend_from_slice(args);
    let out = instance.run(&full);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stats {args:?}: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    if code == 1 {
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    }
    stderr.trim_end().to_owned()
}

#[test]
fn bad_input_and_a_daemon_that_does_not_answer_get_one_line() {
    let instance = Instance::new("stats-errors");
    let message = stats_fails(&instance, &["nosuch"], 1);
    assert_eq!(message, "fuse-blk: no attached device named or at nosuch");
    let message = stats_fails(&instance, &["--interval", "0"], 2);
    assert!(
        message.contains("not a number of seconds above 0"),
        "{message}"
    );
    let message = stats_fails(&instance, &["--json", "--prometheus"], 2);
    assert!(message.contains("cannot be used with"), "{message}");
    let dir = TempDir::new("stats-nodir");
    let missing = dir.join("no/such/dir/out.prom");
    let _device = instance.attach(&["--transport", "loop", "--name", "stopped", "mem:16M"]);
    let message = stats_fails(
        &instance,
        &["--prometheus-file", missing.to_str().unwrap()],
        1,
    );
    assert!(
        message.contains(missing.to_str().unwrap()) && message.contains("No such file"),
        "{message}"
    );

    // A stopped daemon accepts the connection (the kernel does) but never
    // answers.
    let pids = instance.daemons();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let pid = pids[0].to_string();
    sh("kill", &["-STOP", &pid]);
    let started = Instant::now();
    let out = instance.run(["stats", "stopped"]);
    sh("kill", &["-CONT", &pid]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("fuse-blk: stopped: the daemon is not answering"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Without a name, a device whose daemon does not answer is left out
    // with a warning: here the daemon answers again.
    let out = instance.run(["stats", "--json"]);
    assert!(out.status.success());
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports.len(), 1);
}

#[test]
fn a_handed_over_device_reports_its_new_daemon() {
    let instance = Instance::new("stats-handoff");
    let dir = TempDir::new("stats-handoff");
    let image = dir.sparse_image(16 << 20);
    let device = instance.attach(&[
        "--transport",
        "loop",
        "--name",
        "moved",
        "--no-passthrough",
        "--block-size",
        "4096",
        &format!("file:{}", image.display()),
    ]);
    let dev = device.path_str().to_owned();
    let write = |count: u32| {
        dd(&[
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=4096",
            &format!("count={count}"),
            "oflag=direct",
            "conv=notrunc",
        ])
    };
    write(30);
    let old = stats_json(&instance, "moved");
    assert_eq!(counts(&old, "write"), (30, 30 * 4096));
    let out = instance.run(["handoff", "moved"]);
    assert!(
        out.status.success(),
        "handoff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The new daemon counts from zero: its first report covers only what
    // it served (42 would be the old daemon's counters).
    write(12);
    let new = stats_json(&instance, "moved");
    assert_eq!(counts(&new, "write"), (12, 12 * 4096));
    device.detach();
    instance.assert_nothing_left();
}
