#!/usr/bin/env python3
"""Splits each I/O of a depth-1 libaio job into where its time went.

Reads OUT/targets and, per target N, OUT/N.trace: the guest's ftrace text
while fio ran one I/O at a time on the device numbered OUT/N.dev ("MAJOR,MINOR"), holding fio's io_submit and io_getevents
calls, the block layer's request issue and completion, and the scheduler's
switches. Each I/O runs from one io_submit of fio to the next:

  submit   io_submit entered -> the request issued to the driver
           (fio's kernel side above the driver: aio, bio, blk-mq)
  service  issued -> completed (the driver and whatever serves it:
           daemon, server, connection)
  wake-up  completed -> fio back from io_getevents (waking fio, which
           slept in every I/O where `slept` is near 1)
  fio      back from io_getevents -> the next io_submit (fio's own work)

Prints the median of each part (microseconds) and, for the whole I/O, the
median and the mean, whose inverse is the job's IOPS. Only depth 1 pairs
each request with its io_submit: a deeper job is refused.

Usage: timeline.py OUT
"""
import re
import statistics
import sys

# "  fio-314  [001] ...1.  33.629844: sys_io_submit(ctx_id: ..." and
# "  fio-314  [001] ...1.  33.629910: sys_io_submit -> 0x1"
EVENT = re.compile(r"^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+)( ->)?[:(]?(.*)$")

PARTS = ("submit", "service", "wake-up", "fio")


def events(path):
    """(microseconds, task, pid, event, rest) of each traced line."""
    for line in open(path, errors="replace"):
        match = EVENT.match(line)
        if not match:
            continue
        task, pid, seconds, name, exit_mark, rest = match.groups()
        if exit_mark:
            name += "->"
        yield float(seconds) * 1e6, task, int(pid), name, rest


def split_ios(trace, device):
    """Per I/O on DEVICE ("MAJOR,MINOR"): its parts (microseconds), its
    whole length and whether fio slept in it. Refuses a trace with more
    than one request in flight."""
    ours = f"{device} "
    ios = []
    current = None
    for time, task, pid, name, rest in trace:
        if name == "sys_io_submit" and task == "fio":
            if current and "got" in current:
                ios.append((current, time))
            current = {"pid": pid, "submit": time}
        elif current is None or (name.startswith("block_rq_") and not rest.lstrip().startswith(ours)):
            continue
        elif name == "block_rq_issue":
            if "issue" in current:
                sys.exit("timeline: more than one request in flight: the job must run at depth 1")
            current["issue"] = time
        elif name == "block_rq_complete" and "issue" in current:
            current.setdefault("complete", time)
        elif name == "sys_io_getevents->" and pid == current["pid"] and "complete" in current:
            current.setdefault("got", time)
        elif name == "sched_switch" and f"prev_pid={current['pid']} " in rest:
            current["slept"] = True
    rows = []
    for io, next_submit in ios:
        if not io["submit"] <= io["issue"] <= io["complete"] <= io["got"] <= next_submit:
            continue
        parts = (
            io["issue"] - io["submit"],
            io["complete"] - io["issue"],
            io["got"] - io["complete"],
            next_submit - io["got"],
        )
        rows.append((parts, next_submit - io["submit"], io.get("slept", False)))
    return rows


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    targets = [line.split(maxsplit=1) for line in open(f"{out}/targets")]
    print("Depth-1 I/O split by trace (us, medians; a whole I/O's mean is 1e6/IOPS)\n")
    print(f"{'target':28s} {'I/Os':>6s} " + " ".join(f"{p:>8s}" for p in PARTS)
          + f" {'I/O p50':>8s} {'I/O mean':>8s} {'slept':>6s}")
    for n, target in targets:
        device = open(f"{out}/{n}.dev").read().strip()
        rows = split_ios(events(f"{out}/{n}.trace"), device)
        if not rows:
            print(f"{target.strip():28s} no whole I/O traced")
            continue
        medians = [statistics.median(r[0][i] for r in rows) for i in range(len(PARTS))]
        lengths = [r[1] for r in rows]
        slept = sum(r[2] for r in rows) / len(rows)
        print(f"{target.strip():28s} {len(rows):6d} "
              + " ".join(f"{m:8.1f}" for m in medians)
              + f" {statistics.median(lengths):8.1f} {statistics.mean(lengths):8.1f} {slept:6.2f}")


if __name__ == "__main__":
    main()
