#!/usr/bin/env python3
"""Tests of timeline.py's split of depth-1 I/Os on small ftrace fixtures
(run by tests/run)."""
import os
import subprocess
import sys
import tempfile
import unittest

TIMELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timeline.py")
DEVICE = "254,0"


def line(seconds, task, event, rest):
    """One line as the kernel's trace file prints it."""
    return f"{task:>16s} [001] ...1.  {seconds:.6f}: {event}{rest}\n"


def one_io(start, parts, slept=True, device=DEVICE):
    """The trace lines of one depth-1 I/O from fio (pid 300) starting at
    START seconds, its parts (submit, service, wake-up) in microseconds."""
    submit, service, wake = (p / 1e6 for p in parts)
    issue = start + submit
    complete = issue + service
    lines = [
        line(start, "fio-300", "sys_io_submit", "(ctx_id: 1, nr: 1, iocbpp: 2)"),
        line(issue, "fio-300", "block_rq_issue", f": {device} R 4096 () 8 + 8 be,0,4 [fio]"),
        line(issue + 1e-6, "fio-300", "sys_io_submit", " -> 0x1"),
    ]
    if slept:
        lines.append(line(issue + 2e-6, "fio-300", "sched_switch",
                          ": prev_comm=fio prev_pid=300 prev_prio=120 prev_state=S ==> "
                          "next_comm=swapper/1 next_pid=0 next_prio=120"))
    lines += [
        line(complete, "fuse-blk-q0-290", "block_rq_complete", f": {device} R () 8 + 8 be,0,4 [0]"),
        line(complete + wake, "fio-300", "sys_io_getevents", " -> 0x1"),
    ]
    return lines


def timeline(trace, device=DEVICE):
    """timeline.py's output and exit status for one target's trace."""
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "targets"), "w") as f:
            f.write("0 fuse-blk:mem:1G\n")
        with open(os.path.join(d, "0.dev"), "w") as f:
            f.write(device + "\n")
        with open(os.path.join(d, "0.trace"), "w") as f:
            f.write("# tracer: nop\n" + "".join(trace))
        done = subprocess.run([sys.executable, TIMELINE, d], capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr


def figures(out):
    """The target's row: I/Os, then the parts, the I/O p50 and mean, slept."""
    row = next(r for r in out.splitlines() if r.startswith("fuse-blk:mem:1G"))
    return [float(x) for x in row.split()[1:]]


class Timeline(unittest.TestCase):
    def test_parts_of_each_io(self):
        # Three I/Os 200 us apart, each 20 us to the driver, 40 us served,
        # 30 us to wake fio; fio's own part is what is left: 110 us. The
        # last I/O has no next submit, so two are whole.
        trace = []
        for i in range(3):
            trace += one_io(10.0 + i * 200e-6, (20, 40, 30), slept=i != 1)
        status, out = timeline(trace)
        self.assertEqual(status, 0, out)
        ios, submit, service, wake, fio, p50, mean, slept = figures(out)
        self.assertEqual(ios, 2)
        self.assertAlmostEqual(submit, 20, delta=0.5)
        self.assertAlmostEqual(service, 40, delta=0.5)
        self.assertAlmostEqual(wake, 30, delta=0.5)
        self.assertAlmostEqual(fio, 110, delta=0.5)
        self.assertAlmostEqual(p50, 200, delta=0.5)
        self.assertAlmostEqual(mean, 200, delta=0.5)
        self.assertEqual(slept, 0.5)

    def test_other_devices_requests_are_left_out(self):
        # A CD drive's media poll lands in the middle of an I/O.
        trace = one_io(10.0, (20, 40, 30))
        trace[2:2] = one_io(10.000025, (1, 1, 1), device="11,0")[1:2]
        trace += one_io(10.0002, (20, 40, 30))
        status, out = timeline(trace)
        self.assertEqual(status, 0, out)
        self.assertEqual(figures(out)[:3], [1, 20, 40])

    def test_deeper_job_is_refused(self):
        # A second request issued before the first completes.
        trace = one_io(10.0, (20, 40, 30))
        trace[2:2] = [line(10.000021, "fio-300", "block_rq_issue", f": {DEVICE} R 4096 () 64 + 8 be,0,4 [fio]")]
        trace += one_io(10.0002, (20, 40, 30))
        status, out = timeline(trace)
        self.assertNotEqual(status, 0)
        self.assertIn("depth 1", out)


if __name__ == "__main__":
    unittest.main()
