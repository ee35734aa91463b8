#!/usr/bin/env python3
"""Names where the guest's instructions went in a bench/profile run.

Reads OUT/kallsyms, OUT/targets, OUT/ios and, per target N, OUT/N.blocks
(the plugin's "vaddr insns count" lines) and OUT/N.maps (its daemon's
maps). Kernel addresses are named from kallsyms, the daemon's own from
`nm` of the files it mapped; other user addresses (fio's, mostly) are
counted together. Prints instructions per I/O: totals, then the ROWS
functions that executed the most in any one target.

Usage: report.py OUT [ROWS]
"""
import bisect
import collections
import re
import subprocess
import sys

KERNEL_START = 0x800000000000


def sorted_symbols(lines):
    table = sorted(lines)
    return [a for a, _ in table], table


def kernel_symbols(path):
    lines = []
    for line in open(path):
        fields = line.split()
        addr = int(fields[0], 16)
        if addr and fields[1] in "tTwW":
            module = " " + fields[3] if len(fields) > 3 else ""
            lines.append((addr, fields[2] + module))
    return sorted_symbols(lines)


_files = {}


def file_symbols(path):
    if path not in _files:
        lines = []
        for flags in (["--defined-only"], ["-D", "--defined-only"]):
            out = subprocess.run(["nm", "-C", *flags, path], capture_output=True, text=True).stdout
            for line in out.splitlines():
                fields = line.split(" ", 2)
                if len(fields) == 3 and fields[1] in "tTwW":
                    lines.append((int(fields[0], 16), fields[2]))
            if lines:
                break
        _files[path] = sorted_symbols(lines)
    return _files[path]


def lookup(table, addr):
    addrs, entries = table
    i = bisect.bisect_right(addrs, addr) - 1
    return entries[i][1] if i >= 0 else "?"


def daemon_maps(path):
    maps = []
    for line in open(path):
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        maps.append((low, high, fields[5] if len(fields) > 5 else ""))
    bases = {}
    for low, _, name in maps:
        bases.setdefault(name, low)
    return maps, bases


def attribute(out, n, kernel):
    maps, bases = daemon_maps(f"{out}/{n}.maps")
    counts = collections.Counter()
    for line in open(f"{out}/{n}.blocks"):
        vaddr, insns, count = line.split()
        vaddr = int(vaddr, 16)
        executed = int(insns) * int(count)
        if vaddr >= KERNEL_START:
            counts["k " + lookup(kernel, vaddr)] += executed
            continue
        name = "u other processes"
        for low, high, path in maps:
            if low <= vaddr < high:
                if path.startswith("/"):
                    symbol = lookup(file_symbols(path), vaddr - bases[path])
                    symbol = re.sub(r"::h[0-9a-f]{16}$", "", symbol)
                    name = f"d {path.rsplit('/', 1)[-1]}: {symbol}"
                else:
                    name = f"d {path or 'anonymous'}"
                break
        counts[name] += executed
    return counts


def main():
    out = sys.argv[1]
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    kernel = kernel_symbols(f"{out}/kallsyms")
    targets = dict(line.split(" ", 1) for line in open(f"{out}/targets").read().splitlines())
    ios = {line.split()[0]: int(line.split()[1]) for line in open(f"{out}/ios")}
    per_io = {}
    for n in targets:
        counts = attribute(out, n, kernel)
        per_io[n] = {k: v / ios[n] for k, v in counts.items()}
    names = [targets[n].strip() for n in targets]
    width = max(14, *(len(x) for x in names))
    print("Guest instructions per I/O (k: kernel, d: the target's daemon, u: other processes)\n")
    print(f"{'':58}" + "".join(f"{x:>{width + 2}}" for x in names))
    for label, prefix in (("total", ""), ("kernel", "k "), ("daemon", "d "), ("other user", "u ")):
        print(f"{label:58}" + "".join(
            f"{sum(v for k, v in per_io[n].items() if k.startswith(prefix)):>{width + 2}.0f}" for n in targets))
    print()
    keys = set().union(*per_io.values())
    def largest(key):
        return max(per_io[n].get(key, 0) for n in targets)

    for key in sorted(keys, key=largest, reverse=True)[:rows]:
        print(f"{key[:58]:58}" + "".join(f"{per_io[n].get(key, 0):>{width + 2}.0f}" for n in targets))


if __name__ == "__main__":
    main()
