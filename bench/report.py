#!/usr/bin/env python3
"""Turns bench/run's CSV into a markdown table of ratios and an SVG chart.

Ratios are fuse-blk targets against the reference each target of the
project's goals names (same job, same boot)."""
import csv
import sys
from collections import defaultdict

REFERENCES = [
    ("fuse-blk-null-uring", "ublk-null"),
    ("fuse-blk-file-tmpfs-uring", "ublk-loop-tmpfs"),
    ("fuse-blk-file-tmpfs-uring", "loop-tmpfs"),
    ("fuse-blk-mem-uring", "nbd-nbdkit-memory-1conn"),
    ("fuse-blk-mem-uring", "nbd-nbdkit-memory-4conn"),
    ("fuse-blk-null-uring", "brd"),
    ("fuse-blk-null-uring", "fuse-blk-null-rw"),
    ("fuse-blk-mem-uring", "fuse-blk-mem-rw"),
    ("fuse-blk-file-tmpfs-uring", "fuse-blk-file-tmpfs-rw"),
]


def main(csv_path, md_path, svg_path):
    rows = list(csv.DictReader(open(csv_path)))
    iops = defaultdict(dict)
    for row in rows:
        iops[row["job"]][row["target"]] = float(row["iops"])
    jobs = list(dict.fromkeys(row["job"] for row in rows))
    targets = list(dict.fromkeys(row["target"] for row in rows))

    lines = ["# Benchmark (IOPS; one guest boot, software emulation)", ""]
    lines.append("| job | " + " | ".join(targets) + " |")
    lines.append("|---|" + "---|" * len(targets))
    for job in jobs:
        cells = [f"{iops[job].get(t, 0):.0f}" for t in targets]
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    lines += ["", "## Ratios", "", "| job | " + " | ".join(f"{a} / {b}" for a, b in REFERENCES) + " |"]
    lines.append("|---|" + "---|" * len(REFERENCES))
    for job in jobs:
        cells = []
        for a, b in REFERENCES:
            x, y = iops[job].get(a), iops[job].get(b)
            cells.append(f"{x / y:.2f}x" if x and y else "n/a")
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    p50 = {r["target"]: r for r in rows if r["job"] == "randread-4k-qd1"}
    if p50:
        lines += ["", "## 4k random read, queue depth 1 (latency = 1e6 / IOPS, and fio clat p50/p99)", "",
                  "| target | 1e6/IOPS (us) | clat p50 (us) | clat p99 (us) |", "|---|---|---|---|"]
        for t, r in p50.items():
            lines.append(f"| {t} | {1e6 / max(float(r['iops']), 1):.1f} | {r['lat_p50_us']} | {r['lat_p99_us']} |")
    open(md_path, "w").write("\n".join(lines) + "\n")

    # Grouped bars: one group per job, bars scaled to the group's maximum.
    width, group_h, bar_h = 900, 26 + 14 * len(targets), 12
    height = 40 + group_h * len(jobs)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           '<text x="10" y="20" font-size="14">IOPS by job (bars relative to the best target of each job)</text>']
    y = 40
    for job in jobs:
        best = max(iops[job].values()) or 1
        svg.append(f'<text x="10" y="{y + 10}" font-weight="bold">{job}</text>')
        for i, t in enumerate(targets):
            v = iops[job].get(t, 0)
            w = int(500 * v / best)
            by = y + 16 + i * 14
            svg.append(f'<rect x="230" y="{by}" width="{w}" height="{bar_h}" fill="{colors[i % len(colors)]}"/>')
            svg.append(f'<text x="225" y="{by + 10}" text-anchor="end">{t}</text>')
            svg.append(f'<text x="{235 + w}" y="{by + 10}">{v:.0f}</text>')
        y += group_h
    svg.append("</svg>")
    open(svg_path, "w").write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
