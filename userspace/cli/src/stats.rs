//! `fuse-blk stats`: what each device's daemon has served, shaped like
//! `iostat -x`, as JSON, or in Prometheus's text format.
//!
//! The daemon answers `stats` on its control socket with one line of JSON
//! ([`control_answer`]): the engine's counters since it started and its
//! service-time histogram by bucket index. Rates and percentiles of an
//! interval come from the difference of two such answers; the first report
//! covers the time since the daemon started, as iostat's does since boot.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use fuse_blk::stats::{self, Kind, Snapshot, ERROR_NAMES};
use serde::{Deserialize, Serialize};

use crate::state::{self, DeviceDir, DeviceState};

/// Version of the histogram's bucket layout ([`stats::bucket_bounds`]): a
/// client refuses counts of a layout it does not know.
const HISTOGRAM_LAYOUT: u32 = 1;

#[derive(Args)]
pub struct StatsArgs {
    /// The device path or name (default: every attached device).
    device: Option<String>,
    /// One JSON document per report (one line each).
    #[arg(long, conflicts_with_all = ["prometheus", "prometheus_file"])]
    json: bool,
    /// Prometheus text exposition format (counters since each daemon
    /// started).
    #[arg(long)]
    prometheus: bool,
    /// Write the Prometheus text format to PATH (written to a temporary
    /// file and renamed over PATH, for node_exporter's textfile
    /// collector); with --interval, again every interval.
    #[arg(long, value_name = "PATH")]
    prometheus_file: Option<PathBuf>,
    /// Report again every SECONDS (rates over the interval).
    #[arg(long, value_name = "SECONDS", value_parser = parse_interval)]
    interval: Option<f64>,
    /// Stop after N reports (default: 1, or without end with --interval).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0 => Ok(seconds),
        _ => Err(format!("{text} is not a number of seconds above 0")),
    }
}

/// Counts of one kind of request, as the daemon sends them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct KindCounts {
    ops: u64,
    bytes: u64,
    service_ns: u64,
}

/// A daemon's answer to `stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DaemonStats {
    uptime_ns: u64,
    started: u64,
    requests: BTreeMap<String, KindCounts>,
    errors: BTreeMap<String, u64>,
    dropped: u64,
    malformed: u64,
    histogram_layout: u32,
    ns_per_tick: f64,
    /// Non-empty histogram buckets: `[index, count]`.
    histogram: Vec<(usize, u64)>,
    /// An NBD backend's reconnections, each of which reissued the commands
    /// that waited for it (the engine cannot see those); absent for other
    /// backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backend_reconnections: Option<u64>,
}

impl DaemonStats {
    fn from_snapshot(snapshot: &Snapshot) -> DaemonStats {
        DaemonStats {
            uptime_ns: u64::try_from(snapshot.uptime.as_nanos()).unwrap_or(u64::MAX),
            started: snapshot.started,
            requests: Kind::ALL
                .iter()
                .map(|&kind| {
                    let counts = snapshot.kind(kind);
                    (
                        kind.name().to_owned(),
                        KindCounts {
                            ops: counts.ops,
                            bytes: counts.bytes,
                            service_ns: counts.service_ns,
                        },
                    )
                })
                .collect(),
            errors: ERROR_NAMES
                .iter()
                .zip(snapshot.errors)
                .map(|(name, count)| (name.to_string(), count))
                .collect(),
            dropped: snapshot.dropped,
            malformed: snapshot.malformed,
            histogram_layout: HISTOGRAM_LAYOUT,
            ns_per_tick: snapshot.ns_per_tick,
            histogram: snapshot
                .histogram
                .iter()
                .enumerate()
                .filter(|&(_, &count)| count > 0)
                .map(|(index, &count)| (index, count))
                .collect(),
            backend_reconnections: crate::backend::reconnections(),
        }
    }

    fn kind(&self, kind: Kind) -> KindCounts {
        self.requests.get(kind.name()).copied().unwrap_or_default()
    }

    fn completed(&self) -> u64 {
        self.requests.values().map(|counts| counts.ops).sum()
    }

    fn in_flight(&self) -> u64 {
        self.started.saturating_sub(self.completed())
    }

    fn errors(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Histogram counts by bucket index.
    fn buckets(&self) -> BTreeMap<usize, u64> {
        self.histogram.iter().copied().collect()
    }
}

/// What the daemon answers to `stats`: `ok` and one line of JSON.
pub fn control_answer() -> String {
    match stats::process_snapshot() {
        Some(snapshot) => match serde_json::to_string(&DaemonStats::from_snapshot(&snapshot)) {
            Ok(json) => format!("ok {json}"),
            Err(e) => format!("error {e}"),
        },
        None => "error the daemon serves no session yet".into(),
    }
}

/// Asks the daemon of a device for its counters.
fn request(dir: &DeviceDir, record: &DeviceState) -> Result<DaemonStats, String> {
    let not_answering = |why: String| {
        format!(
            "{}: the daemon is not answering ({why}); see fuse-blk list",
            record.name
        )
    };
    if !record.daemon_alive() {
        return Err(not_answering(format!("pid {} is gone", record.pid)));
    }
    let stream =
        UnixStream::connect(dir.control_socket()).map_err(|e| not_answering(e.to_string()))?;
    // It answers one command at a time: a detach under way holds it.
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| not_answering(e.to_string()))?;
    (&stream)
        .write_all(b"stats\n")
        .map_err(|e| not_answering(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| not_answering(e.to_string()))?;
    let answer = answer.trim_end();
    if let Some(json) = answer.strip_prefix("ok ") {
        let stats: DaemonStats = serde_json::from_str(json).map_err(|e| {
            format!(
                "{}: unexpected statistics from the daemon: {e}",
                record.name
            )
        })?;
        if stats.histogram_layout != HISTOGRAM_LAYOUT {
            return Err(format!(
                "{}: the daemon's histogram has layout {}, this fuse-blk knows {HISTOGRAM_LAYOUT}",
                record.name, stats.histogram_layout
            ));
        }
        return Ok(stats);
    }
    match answer.strip_prefix("error ") {
        Some(message) if message.starts_with("unknown command") => Err(format!(
            "{}: the daemon does not report statistics (started by an older fuse-blk?)",
            record.name
        )),
        Some(message) => Err(format!("{}: {message}", record.name)),
        None if answer.is_empty() => Err(not_answering("no answer".into())),
        None => Err(format!(
            "{}: unexpected answer from the daemon: {answer:?}",
            record.name
        )),
    }
}

/// A device's counters at one time.
struct Sample {
    dir: DeviceDir,
    record: DeviceState,
    stats: DaemonStats,
}

/// The devices asked for, and their counters now. With a name, its daemon
/// must answer; without, devices whose daemon does not answer are left out
/// with a warning.
fn sample(target: Option<&str>) -> Result<Vec<Sample>, String> {
    let devices: Vec<(DeviceDir, DeviceState)> = match target {
        Some(target) => vec![state::find(target)?],
        None => state::all()
            .into_iter()
            .filter_map(|dir| dir.read().ok().map(|record| (dir, record)))
            .filter(|(_, record)| !record.device.is_empty())
            .collect(),
    };
    let mut samples = Vec::new();
    for (dir, record) in devices {
        match request(&dir, &record) {
            Ok(stats) => samples.push(Sample { dir, record, stats }),
            Err(e) if target.is_some() => return Err(e),
            Err(e) => eprintln!("fuse-blk: {e}"),
        }
    }
    Ok(samples)
}

/// One device's report over an interval.
#[derive(Serialize)]
struct Report {
    name: String,
    device: String,
    /// Seconds the rates are over: since the daemon started, or the
    /// interval.
    interval_s: f64,
    /// The kernel serves reads and writes itself: they are not counted.
    passthrough: bool,
    /// Counters since the daemon started.
    total: DaemonStats,
    /// Requests answered per second, by kind.
    ops_per_s: BTreeMap<String, f64>,
    /// Kilobytes (1024 bytes) per second, by kind.
    kb_per_s: BTreeMap<String, f64>,
    /// Requests received and not yet answered, now.
    in_flight: u64,
    /// Average number of requests being served over the interval (as
    /// iostat's aqu-sz): total service time over elapsed time.
    queue_depth: f64,
    /// Service-time percentiles over the interval, in microseconds.
    service_us: BTreeMap<String, Option<f64>>,
    /// Mean service time per kind over the interval, in microseconds.
    await_us: BTreeMap<String, Option<f64>>,
    /// Errors answered over the interval.
    errors: u64,
}

const PERCENTILES: [(&str, f64); 3] = [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)];

impl Report {
    /// From counters now and, unless this is the first report, at the
    /// interval's start (the same daemon's: a new daemon starts at zero).
    fn new(now: &Sample, before: Option<&DaemonStats>) -> Report {
        let before = before.filter(|before| {
            before.uptime_ns <= now.stats.uptime_ns && before.started <= now.stats.started
        });
        let elapsed_ns = now.stats.uptime_ns - before.map_or(0, |b| b.uptime_ns);
        let seconds = (elapsed_ns as f64 / 1e9).max(1e-9);
        let delta = |kind: Kind| {
            let now = now.stats.kind(kind);
            let then = before.map(|b| b.kind(kind)).unwrap_or_default();
            KindCounts {
                ops: now.ops.saturating_sub(then.ops),
                bytes: now.bytes.saturating_sub(then.bytes),
                service_ns: now.service_ns.saturating_sub(then.service_ns),
            }
        };
        let mut ops_per_s = BTreeMap::new();
        let mut kb_per_s = BTreeMap::new();
        let mut await_us = BTreeMap::new();
        let mut busy_ns = 0;
        for kind in Kind::ALL {
            let counts = delta(kind);
            busy_ns += counts.service_ns;
            ops_per_s.insert(kind.name().to_owned(), counts.ops as f64 / seconds);
            kb_per_s.insert(
                kind.name().to_owned(),
                counts.bytes as f64 / 1024.0 / seconds,
            );
            await_us.insert(
                kind.name().to_owned(),
                (counts.ops > 0).then(|| counts.service_ns as f64 / counts.ops as f64 / 1e3),
            );
        }
        let buckets_then = before.map(DaemonStats::buckets).unwrap_or_default();
        let ns_per_tick = now.stats.ns_per_tick;
        let buckets: Vec<(u64, u64, u64)> = now
            .stats
            .buckets()
            .into_iter()
            .map(|(index, count)| {
                let count = count.saturating_sub(buckets_then.get(&index).copied().unwrap_or(0));
                let (low, high) = stats::bucket_bounds(index);
                let ns = |ticks: u64| (ticks as f64 * ns_per_tick) as u64;
                (ns(low), ns(high).max(ns(low) + 1), count)
            })
            .collect();
        let service_us = PERCENTILES
            .iter()
            .map(|&(name, q)| {
                (
                    name.to_owned(),
                    stats::quantile(&buckets, q).map(|ns| ns as f64 / 1e3),
                )
            })
            .collect();
        Report {
            name: now.record.name.clone(),
            device: now.record.device.clone(),
            interval_s: seconds,
            passthrough: now.record.passthrough,
            total: now.stats.clone(),
            ops_per_s,
            kb_per_s,
            in_flight: now.stats.in_flight(),
            queue_depth: busy_ns as f64 / elapsed_ns.max(1) as f64,
            service_us,
            await_us,
            errors: now
                .stats
                .errors()
                .saturating_sub(before.map_or(0, DaemonStats::errors)),
        }
    }
}

fn print_table(reports: &[Report]) {
    println!(
        "{:<16} {:>9} {:>9} {:>8} {:>9} {:>9} {:>10} {:>10} {:>7} {:>6} {:>9} {:>9} {:>9} {:>6}",
        "NAME",
        "r/s",
        "w/s",
        "flush/s",
        "discard/s",
        "zeroes/s",
        "rkB/s",
        "wkB/s",
        "aqu-sz",
        "inflt",
        "p50(us)",
        "p99(us)",
        "p99.9(us)",
        "errors"
    );
    let fixed = |value: f64, decimals: usize| format!("{value:.decimals$}");
    let percentile = |value: Option<f64>| value.map_or("-".into(), |us| fixed(us, 1));
    for report in reports {
        let rate = |map: &BTreeMap<String, f64>, kind: Kind| map[kind.name()];
        println!(
            "{:<16} {:>9} {:>9} {:>8} {:>9} {:>9} {:>10} {:>10} {:>7} {:>6} {:>9} {:>9} {:>9} {:>6}",
            report.name,
            fixed(rate(&report.ops_per_s, Kind::Read), 1),
            fixed(rate(&report.ops_per_s, Kind::Write), 1),
            fixed(rate(&report.ops_per_s, Kind::Flush), 1),
            fixed(rate(&report.ops_per_s, Kind::Discard), 1),
            fixed(rate(&report.ops_per_s, Kind::WriteZeroes), 1),
            fixed(rate(&report.kb_per_s, Kind::Read), 1),
            fixed(rate(&report.kb_per_s, Kind::Write), 1),
            fixed(report.queue_depth, 2),
            report.in_flight,
            percentile(report.service_us["p50"]),
            percentile(report.service_us["p99"]),
            percentile(report.service_us["p99.9"]),
            report.errors,
        );
    }
}

/// Prometheus label values escape backslash, double quote and newline.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Upper bounds of the Prometheus histogram's buckets, in seconds.
const PROMETHEUS_BOUNDS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters of every sample in the Prometheus text exposition format.
fn prometheus(samples: &[Sample]) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, lines: &mut dyn FnMut(&mut String)| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        lines(&mut out);
    };
    family(
        "fuse_blk_requests_total",
        "counter",
        "Block requests the daemon answered, successfully or not.",
        &mut |out| {
            for sample in samples {
                for kind in Kind::ALL {
                    out.push_str(&format!(
                        "fuse_blk_requests_total{{device=\"{}\",op=\"{}\"}} {}\n",
                        label(&sample.record.name),
                        kind.name(),
                        sample.stats.kind(kind).ops
                    ));
                }
            }
        },
    );
    family(
        "fuse_blk_bytes_total",
        "counter",
        "Bytes of the block requests answered successfully.",
        &mut |out| {
            for sample in samples {
                for kind in Kind::ALL {
                    out.push_str(&format!(
                        "fuse_blk_bytes_total{{device=\"{}\",op=\"{}\"}} {}\n",
                        label(&sample.record.name),
                        kind.name(),
                        sample.stats.kind(kind).bytes
                    ));
                }
            }
        },
    );
    family(
        "fuse_blk_errors_total",
        "counter",
        "Block requests answered with an error, by errno.",
        &mut |out| {
            for sample in samples {
                for (errno, count) in &sample.stats.errors {
                    out.push_str(&format!(
                        "fuse_blk_errors_total{{device=\"{}\",errno=\"{}\"}} {count}\n",
                        label(&sample.record.name),
                        label(errno)
                    ));
                }
            }
        },
    );
    family(
        "fuse_blk_dropped_replies_total",
        "counter",
        "Block requests answered EIO because the handler dropped the reply.",
        &mut |out| {
            for sample in samples {
                out.push_str(&format!(
                    "fuse_blk_dropped_replies_total{{device=\"{}\"}} {}\n",
                    label(&sample.record.name),
                    sample.stats.dropped
                ));
            }
        },
    );
    family(
        "fuse_blk_backend_reconnections_total",
        "counter",
        "Times an NBD backend's connections were made again, reissuing the commands that waited.",
        &mut |out| {
            for sample in samples {
                if let Some(count) = sample.stats.backend_reconnections {
                    out.push_str(&format!(
                        "fuse_blk_backend_reconnections_total{{device=\"{}\"}} {count}\n",
                        label(&sample.record.name)
                    ));
                }
            }
        },
    );
    family(
        "fuse_blk_in_flight",
        "gauge",
        "Block requests received by the daemon and not yet answered.",
        &mut |out| {
            for sample in samples {
                out.push_str(&format!(
                    "fuse_blk_in_flight{{device=\"{}\"}} {}\n",
                    label(&sample.record.name),
                    sample.stats.in_flight()
                ));
            }
        },
    );
    family(
        "fuse_blk_daemon_uptime_seconds",
        "gauge",
        "Seconds since the daemon serving the device started counting.",
        &mut |out| {
            for sample in samples {
                out.push_str(&format!(
                    "fuse_blk_daemon_uptime_seconds{{device=\"{}\"}} {}\n",
                    label(&sample.record.name),
                    sample.stats.uptime_ns as f64 / 1e9
                ));
            }
        },
    );
    family(
        "fuse_blk_service_seconds",
        "histogram",
        "Time from a block request's arrival in the daemon to its reply.",
        &mut |out| {
            for sample in samples {
                let device = label(&sample.record.name);
                let ns_per_tick = sample.stats.ns_per_tick;
                // Each bucket of the daemon's finer histogram is counted
                // under the first bound at or above its middle.
                let mut cumulative = vec![0u64; PROMETHEUS_BOUNDS.len()];
                let mut count = 0;
                for &(index, n) in &sample.stats.histogram {
                    let (low, high) = stats::bucket_bounds(index);
                    let middle = (low + high) as f64 / 2.0 * ns_per_tick / 1e9;
                    for (bound, sum) in PROMETHEUS_BOUNDS.iter().zip(&mut cumulative) {
                        if middle <= *bound {
                            *sum += n;
                        }
                    }
                    count += n;
                }
                for (bound, sum) in PROMETHEUS_BOUNDS.iter().zip(&cumulative) {
                    out.push_str(&format!(
                        "fuse_blk_service_seconds_bucket{{device=\"{device}\",le=\"{bound}\"}} {sum}\n"
                    ));
                }
                out.push_str(&format!(
                    "fuse_blk_service_seconds_bucket{{device=\"{device}\",le=\"+Inf\"}} {count}\n"
                ));
                let total_ns: u64 = sample.stats.requests.values().map(|c| c.service_ns).sum();
                out.push_str(&format!(
                    "fuse_blk_service_seconds_sum{{device=\"{device}\"}} {}\n",
                    total_ns as f64 / 1e9
                ));
                out.push_str(&format!(
                    "fuse_blk_service_seconds_count{{device=\"{device}\"}} {count}\n"
                ));
            }
        },
    );
    out
}

/// Replaces `path` with `contents` at once: a reader sees the old file or
/// the new one, never a part.
fn write_atomically(path: &Path, contents: &str) -> Result<(), String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    let written = std::fs::File::create(&temporary)
        .and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_data()
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        format!("{}: {e}", path.display())
    })
}

pub fn run(args: StatsArgs) -> Result<(), String> {
    let count = args
        .count
        .unwrap_or(if args.interval.is_some() { u64::MAX } else { 1 });
    let interval = args.interval.map(Duration::from_secs_f64);
    let mut previous: BTreeMap<PathBuf, DaemonStats> = BTreeMap::new();
    let mut next = Instant::now();
    for report in 0..count {
        if report > 0 {
            next += interval.unwrap_or_default();
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let samples = sample(args.device.as_deref())?;
        if args.prometheus || args.prometheus_file.is_some() {
            let text = prometheus(&samples);
            if let Some(path) = &args.prometheus_file {
                write_atomically(path, &text)?;
            }
            if args.prometheus {
                print!("{text}");
            }
        } else {
            let reports: Vec<Report> = samples
                .iter()
                .map(|sample| Report::new(sample, previous.get(&sample.dir.path)))
                .collect();
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&reports).map_err(|e| e.to_string())?
                );
            } else {
                if report > 0 {
                    println!();
                }
                print_table(&reports);
            }
        }
        let _ = std::io::stdout().flush();
        previous = samples
            .into_iter()
            .map(|sample| (sample.dir.path, sample.stats))
            .collect();
    }
    Ok(())
}
