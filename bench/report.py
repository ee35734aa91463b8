#!/usr/bin/env python3
"""Turns bench/run's (or bench/host's) CSV into a markdown table of ratios
and an SVG chart.

Usage: report.py [--host | --nbd | --qcow2 | --dm-user [--reliability RELIABILITY_CSV]] [--memory MEMORY_CSV] CSV MD SVG

Rows may carry a `round` column (one guest boot, or one host round). A
ratio is taken within each round, where the two targets ran side by side;
the report gives the median over rounds of those ratios, the median IOPS
of each target, and whether each of the project's targets is met (the
median ratio reaches the threshold for every job). The guest's round 0
is the pass that writes every device whole once before the rounds
(bench/guest, `fill`): shown, and kept out of the verdicts, which are on
the steady state the rounds measure.

MEMORY_CSV (bench/guest's `rss` rows: target, when, rss_kib, boot) adds
the daemons' resident memory while idle, before any I/O and after the
rounds, and the verdict on the idle-memory target, which every boot's
figure must meet.

--nbd judges bench/nbd's targets (NBD_PAIRS), and the idle memory of
the fuse-blk-nbd-* daemons (IDLE_MEMORY_TARGETS_NBD) instead.

--qcow2 judges bench/qcow2's targets (QCOW2_PAIRS), and the idle memory
of the fuse-blk-qcow2-* daemons against its own limit
(IDLE_MEMORY_LIMIT_KIB_QCOW2); its round 0 (the images as made, then the
first write) is shown and not judged.

--dm-user judges bench/dm-user's targets (DMUSER_PAIRS); RELIABILITY_CSV
(path, what, cycles, failed_cycles, fio_errors, kernel_io_errors, boot)
adds the table of daemon replacements and restarts, and the verdict on
zero I/O errors across fuse-blk's."""
import csv
import statistics
import sys
from collections import defaultdict

# (target, reference, threshold or None): the goals, then context.
GUEST_PAIRS = [
    ("fuse-blk-null-uring", "ublk-null", 1.0),
    ("fuse-blk-file-tmpfs-uring", "ublk-loop-tmpfs", 1.0),
    ("fuse-blk-file-tmpfs-passthrough", "ublk-loop-tmpfs", 1.0),
    ("fuse-blk-mem-uring", "nbd-nbdkit-memory-1conn", 5.0),
    ("fuse-blk-mem-uring", "nbd-nbdkit-memory-4conn", 5.0),
    ("fuse-blk-file-tmpfs-uring", "loop-tmpfs", None),
    ("fuse-blk-file-tmpfs-passthrough", "loop-tmpfs", None),
    ("fuse-blk-null-uring", "brd", None),
    ("fuse-blk-null-uring", "fuse-blk-null-rw", None),
    ("fuse-blk-null-uring", "fuse-blk-null-uring-nopoll", None),
    ("fuse-blk-mem-uring", "fuse-blk-mem-rw", None),
    ("fuse-blk-file-tmpfs-uring", "fuse-blk-file-tmpfs-rw", None),
]
# bench/dm-user: the goals (fuse-blk at least 2x dm-user with the
# same handler, on dm-user's own target; ext4 on fuse-blk at least 0.8x
# tmpfs, where dm-user claimed 0.5x), then context: the bridge stands in
# for dm-user where the kernel has none.
DMUSER_PAIRS = [
    ("fuse-blk-mem-uring", "dmu-existing-rust", 2.0),
    ("ext4-fuse-blk-mem-uring", "tmpfs-file", 0.8),
    ("fuse-blk-mem-rw", "dmu-existing-rust", None),
    ("fuse-blk-mem-uring", "dmu-bridge-rust", None),
    ("fuse-blk-mem-rw", "dmu-bridge-rust", None),
    ("fuse-blk-mem-uring", "dmu-bridge-c", None),
    ("fuse-blk-mem-uring", "dmu-existing-c", None),
    ("dmu-existing-rust", "dmu-existing-c", None),
    ("ext4-fuse-blk-mem-rw", "tmpfs-file", None),
    ("ext4-dmu-existing-rust", "tmpfs-file", None),
    ("ext4-dmu-existing-c", "tmpfs-file", None),
    ("ext4-dmu-bridge-rust", "tmpfs-file", None),
    ("ext4-dmu-bridge-c", "tmpfs-file", None),
]
# bench/nbd (issue 28): fuse-blk's nbd: backend on the module against the
# kernel's nbd client and rublk's nbd target on the same nbdkit server, over
# a unix socket and loopback TCP; then context: one transport against the
# other, and the kernel client's connections.
NBD_PAIRS = [
    (f"fuse-blk-nbd-{t}", f"{ref}-{t}{conns}", threshold)
    for t in ("unix", "tcp")
    for ref, conns, threshold in (("kernel-nbd", "-1conn", 1.2), ("kernel-nbd", "-4conn", 1.2),
                                  ("rublk-nbd", "", 1.0))
] + [
    ("fuse-blk-nbd-unix", "fuse-blk-nbd-tcp", None),
    ("kernel-nbd-unix-4conn", "kernel-nbd-unix-1conn", None),
    ("rublk-nbd-unix", "rublk-nbd-tcp", None),
]
# bench/qcow2 (issue 27): fuse-blk's qcow2: backend against rublk's qcow2
# target and qemu-nbd with the kernel's nbd client, on a fresh image and on
# an overlay (rublk's over a qcow2 base: it takes no raw one; fuse-blk's on
# the same for that pair); then context: fuse-blk on one kind of image
# against another.
QCOW2_PAIRS = [
    ("fuse-blk-qcow2-fresh", "rublk-qcow2-fresh", 1.0),
    ("fuse-blk-qcow2-fresh", "qemu-nbd-fresh", 2.0),
    ("fuse-blk-qcow2-overlay", "rublk-qcow2-overlay", 1.0),
    ("fuse-blk-qcow2-overlay-qcow2base", "rublk-qcow2-overlay-qcow2base", 1.0),
    ("fuse-blk-qcow2-overlay", "qemu-nbd-overlay", 2.0),
    ("fuse-blk-qcow2-overlay", "fuse-blk-qcow2-fresh", None),
    ("fuse-blk-qcow2-overlay-qcow2base", "fuse-blk-qcow2-overlay", None),
]
# The reliability goal: no I/O error across these paths' cycles.
RELIABILITY_GOAL_PATHS = "fuse-blk-"
# Measured, shown and not judged: the first write of a fresh device.
UNJUDGED_JOBS = {"first-write-1m-qd8", "first-randread-4k-qd32x2", "first-randwrite-4k-qd32x2"}
# The idle-memory goal: daemons of these targets, idle, stay under this.
IDLE_MEMORY_TARGETS = "fuse-blk-file-"
IDLE_MEMORY_TARGETS_NBD = "fuse-blk-nbd-"
IDLE_MEMORY_LIMIT_KIB = 8 * 1024
IDLE_MEMORY_TARGETS_QCOW2 = "fuse-blk-qcow2-"
IDLE_MEMORY_LIMIT_KIB_QCOW2 = 16 * 1024
HOST_PAIRS = [
    ("stock-file-tmpfs-passthrough", "qsd-fuse-loop", 1.5),
    ("stock-file-tmpfs-uring", "qsd-fuse-loop", 1.5),
    ("stock-file-tmpfs-rw", "qsd-fuse-loop", 1.5),
    ("stock-file-tmpfs-passthrough", "loop-tmpfs", None),
    ("stock-file-tmpfs-uring", "loop-tmpfs", None),
    ("stock-file-tmpfs-uring", "stock-file-tmpfs-rw", None),
    ("stock-null-uring", "stock-null-rw", None),
    ("stock-null-rw", "qsd-fuse-loop", None),
]


def memory_lines(path, judged_prefix, limit_kib=IDLE_MEMORY_LIMIT_KIB):
    """The report's lines on daemon memory, and the idle-memory verdict's
    row of the Targets table (on the daemons of targets named
    judged_prefix*)."""
    # kib[target][when] = [one per boot]
    kib = defaultdict(lambda: defaultdict(list))
    for row in csv.DictReader(open(path)):
        kib[row["target"]][row["when"]].append(int(row["rss_kib"]))
    whens = list(dict.fromkeys(w for t in kib.values() for w in t))
    lines = ["", "## Daemon memory while idle (VmRSS in MiB: median over boots, highest boot)", "",
             "| target | " + " | ".join(whens) + " |", "|---|" + "---|" * len(whens)]
    for target, by_when in kib.items():
        lines.append(f"| {target} | " + " | ".join(
            f"{statistics.median(v) / 1024:.1f} ({max(v) / 1024:.1f})" if (v := by_when.get(w)) else "n/a"
            for w in whens) + " |")
    judged = [(max(v), target, when) for target, by_when in kib.items() if target.startswith(judged_prefix)
              for when, v in by_when.items()]
    if not judged:
        return lines, "no data |"
    worst, target, when = max(judged)
    met = worst < limit_kib
    return lines, f"{'yes' if met else 'no'} | {target} {when} {worst / 1024:.1f} MiB |"


def reliability_lines(path):
    """The report's table of daemon replacements and restarts, and the
    zero-I/O-error verdict on fuse-blk's paths."""
    rows = list(csv.DictReader(open(path)))
    lines = ["", "## Reliability: daemons replaced and restarted under a looping fio verify on ext4", "",
             "| path | cycles | boot | cycles that failed | fio runs failed | kernel I/O errors |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} {r['what']} | {r['cycles']} | {r['boot']} | {r['failed_cycles']} | "
                     f"{r['fio_errors']} | {r['kernel_io_errors']} |")
    ours = [r for r in rows if r["path"].startswith(RELIABILITY_GOAL_PATHS)]
    errors = sum(int(r["failed_cycles"]) + int(r["fio_errors"]) + int(r["kernel_io_errors"]) for r in ours)
    cycles = sum(int(r["cycles"]) for r in ours)
    if not ours:
        return lines, "no data |"
    return lines, f"{'yes' if errors == 0 else 'no'} | {errors} errors in {cycles} cycles |"


def main(args):
    host = args[0] == "--host"
    if host:
        args = args[1:]
    nbd = args[0] == "--nbd"
    if nbd:
        args = args[1:]
    qcow2 = args[0] == "--qcow2"
    if qcow2:
        args = args[1:]
    dm_user = args[0] == "--dm-user"
    reliability_path = None
    if dm_user:
        args = args[1:]
        if args[0] == "--reliability":
            reliability_path, args = args[1], args[2:]
    memory_path = None
    if args[0] == "--memory":
        memory_path, args = args[1], args[2:]
    csv_path, md_path, svg_path = args
    memory_prefix = IDLE_MEMORY_TARGETS_NBD if nbd else IDLE_MEMORY_TARGETS_QCOW2 if qcow2 else IDLE_MEMORY_TARGETS
    memory_limit = IDLE_MEMORY_LIMIT_KIB_QCOW2 if qcow2 else IDLE_MEMORY_LIMIT_KIB
    memory, verdict = memory_lines(memory_path, memory_prefix, memory_limit) if memory_path else ([], None)
    reliability, reliability_verdict = reliability_lines(reliability_path) if reliability_path else ([], None)
    pairs = (HOST_PAIRS if host else NBD_PAIRS if nbd else QCOW2_PAIRS if qcow2
             else DMUSER_PAIRS if dm_user else GUEST_PAIRS)
    rows = list(csv.DictReader(open(csv_path)))
    # iops[round][job][target]
    iops = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        iops[row.get("round") or "1"][row["job"]][row["target"]] = float(row["iops"])
    rounds = sorted(iops)
    jobs = list(dict.fromkeys(row["job"] for row in rows))
    targets = list(dict.fromkeys(row["target"] for row in rows))

    def median_iops(job, target):
        values = [iops[r][job][target] for r in rounds if target in iops[r][job]]
        return statistics.median(values) if values else 0.0

    def ratios(job, a, b):
        return [iops[r][job][a] / iops[r][job][b] for r in rounds
                if iops[r][job].get(a) and iops[r][job].get(b)]

    if host:
        where = f"median of {len(rounds)} host rounds"
    else:
        # Guest rounds are named BOOT.ROUND (older results: BOOT); a boot's
        # first-write pass is a round of its own.
        boots = len({r.split(".")[0] for r in rounds})
        measured = [r for r in rounds if set(iops[r]) - UNJUDGED_JOBS]
        where = f"software emulation; median of {len(measured)} rounds in {boots} guest boots"
        if len(measured) < len(rounds):
            where += ", after a first write of every device"
    title = ("dm-user comparison" if dm_user else "nbd: comparison" if nbd
             else "qcow2: comparison" if qcow2 else "Benchmark")
    lines = [f"# {title} ({'host' if host else 'guest'}; {where})", ""]
    lines += ["## Median IOPS", "", "| job | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for job in jobs:
        lines.append(f"| {job} | " + " | ".join(f"{median_iops(job, t):.0f}" for t in targets) + " |")

    lines += ["", "## Ratios (median over rounds of the within-round ratio; lowest-highest round)", "",
              "| job | " + " | ".join(f"{a} / {b}" for a, b, _ in pairs) + " |",
              "|---|" + "---|" * len(pairs)]
    for job in jobs:
        cells = []
        for a, b, _ in pairs:
            r = ratios(job, a, b)
            spread = f" ({min(r):.2f}-{max(r):.2f})" if len(r) > 1 else ""
            cells.append(f"{statistics.median(r):.2f}x{spread}" if r else "n/a")
        lines.append(f"| {job} | " + " | ".join(cells) + " |")

    goals = [(a, b, t) for a, b, t in pairs if t is not None]
    if goals:
        judged = [job for job in jobs if job not in UNJUDGED_JOBS]
        unjudged = [job for job in jobs if job in UNJUDGED_JOBS]
        lines += ["", "## Targets", "",
                  "| target | threshold | met | worst job |" + "".join(f" {j} (not judged) |" for j in unjudged),
                  "|---|---|---|---|" + "---|" * len(unjudged)]
        for a, b, threshold in goals:
            medians = {job: statistics.median(r) for job in judged if (r := ratios(job, a, b))}
            shown = "".join(f" {statistics.median(r):.2f}x |" if (r := ratios(job, a, b)) else " n/a |"
                            for job in unjudged)
            if not medians:
                lines.append(f"| {a} / {b} | {threshold}x | no data | |" + shown)
                continue
            worst = min(medians, key=medians.get)
            met = all(v >= threshold for v in medians.values()) and len(medians) == len(judged)
            lines.append(f"| {a} / {b} | {threshold}x | {'yes' if met else 'no'} | "
                         f"{worst} {medians[worst]:.2f}x |" + shown)
        if memory_path:
            lines.append(f"| {memory_prefix}* daemons idle, VmRSS | < {memory_limit // 1024} MiB | "
                         + verdict + " |" * len(unjudged))
        if reliability_path:
            lines.append(f"| {RELIABILITY_GOAL_PATHS}* replacements and restarts, I/O errors | 0 | "
                         + reliability_verdict + " |" * len(unjudged))

    if len(rounds) > 1:
        lines += ["", "## Ratios per round", ""]
        for a, b, _ in pairs:
            for job in jobs:
                r = ratios(job, a, b)
                if r:
                    lines.append(f"- {a} / {b}, {job}: " + ", ".join(f"{x:.2f}x" for x in r))

    lines += memory
    lines += reliability
    qd1 = [r for r in rows if r["job"] == "randread-4k-qd1"]
    if qd1:
        lines += ["", "## 4k random read, queue depth 1 (median 1e6/IOPS; fio total latency p50/p99)", "",
                  "| target | 1e6/IOPS (us) | lat p50 (us) | lat p99 (us) |", "|---|---|---|---|"]
        for t in targets:
            mine = [r for r in qd1 if r["target"] == t]
            if not mine:
                continue
            p50 = statistics.median(float(r["lat_p50_us"]) for r in mine)
            p99 = statistics.median(float(r["lat_p99_us"]) for r in mine)
            lines.append(f"| {t} | {1e6 / max(median_iops('randread-4k-qd1', t), 1):.1f} | {p50:.1f} | {p99:.1f} |")
    open(md_path, "w").write("\n".join(lines) + "\n")

    # Grouped bars: one group per job, bars scaled to the group's maximum.
    width, group_h, bar_h = 900, 26 + 14 * len(targets), 12
    height = 40 + group_h * len(jobs)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           '<text x="10" y="20" font-size="14">Median IOPS by job (bars relative to the best target of each job)</text>']
    y = 40
    for job in jobs:
        best = max(median_iops(job, t) for t in targets) or 1
        svg.append(f'<text x="10" y="{y + 10}" font-weight="bold">{job}</text>')
        for i, t in enumerate(targets):
            v = median_iops(job, t)
            w = int(500 * v / best)
            by = y + 16 + i * 14
            svg.append(f'<rect x="230" y="{by}" width="{w}" height="{bar_h}" fill="{colors[i % len(colors)]}"/>')
            svg.append(f'<text x="225" y="{by + 10}" text-anchor="end">{t}</text>')
            svg.append(f'<text x="{235 + w}" y="{by + 10}">{v:.0f}</text>')
        y += group_h
    svg.append("</svg>")
    open(svg_path, "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
