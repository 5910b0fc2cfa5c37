#!/usr/bin/env python3
"""CPU time and context switches per committed transaction, by process kind.

Runs a pgbench command, and over a window in the middle of the run (when
every session's backend exists) reads user + system time from
/proc/<pid>/stat and voluntary + involuntary context switches from
/proc/<pid>/task/*/status of every PostgreSQL process, mtm-proxy and
pgbench, then divides by the transactions pgbench reports per second.
Processes are grouped by their title (`postgres: mtm-node1: multimaster
receiver ...` -> "mtm-node1: multimaster receiver"), client backends as
"<node> backend".

Usage: bench/cpu-per-process.py [--skip 3] [--window 10] -- pgbench <args>
(the pgbench run must last longer than skip + window seconds).
"""
import argparse
import collections
import os
import re
import subprocess
import time


def snapshot():
    """pid -> (title, CPU ticks, context switches) of every process."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            title = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
            fields = stat[stat.rindex(")") + 2:].split()
            ticks = int(fields[11]) + int(fields[12])
            switches = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                for line in open(f"/proc/{pid}/task/{tid}/status"):
                    if "ctxt_switches" in line:
                        switches += int(line.split()[1])
        except (OSError, ValueError):
            continue  # gone meanwhile
        procs[pid] = (title, ticks, switches)
    return procs


def kind(title):
    """The group a process belongs to, None for processes not measured."""
    if "mtm-proxy" in title:
        return "mtm-proxy"
    if title.startswith("pgbench"):
        return "pgbench"
    if not title.startswith("postgres:"):
        return None
    node, _, what = title[len("postgres:"):].strip().partition(": ")
    if not what:
        return f"postgres {node}"
    if what.startswith("walsender"):
        return f"{node}: walsender"
    if re.match(r"\S+ \S+ (\d+\.\d+\.\d+\.\d+|\[local\])", what):
        return f"{node}: backend"
    return f"{node}: " + " ".join(what.split()[:2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", type=float, default=3, help="seconds before the window")
    parser.add_argument("--window", type=float, default=10, help="seconds measured")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(args.skip)
    before, started = snapshot(), time.time()
    time.sleep(args.window)
    after, elapsed = snapshot(), time.time() - started
    output = run.communicate()[0]
    found = re.search(r"tps = ([\d.]+)", output)
    if not found:
        raise SystemExit(f"no tps in pgbench's output:\n{output}")
    transactions = float(found.group(1)) * elapsed
    cpu, switches = collections.Counter(), collections.Counter()
    for pid, (title, ticks, sw) in after.items():
        group = kind(title)
        if group is None:
            continue
        _, ticks0, sw0 = before.get(pid, (title, 0, 0))
        cpu[group] += ticks - ticks0
        switches[group] += sw - sw0
    hz = os.sysconf("SC_CLK_TCK")
    print(f"tps {float(found.group(1)):.0f}")
    print(f"{'process':40} {'CPU ms/tx':>10} {'switches/tx':>12}")
    for group, ticks in cpu.most_common():
        print(f"{group:40} {ticks / hz * 1000 / transactions:10.3f} {switches[group] / transactions:12.1f}")
    print(f"{'all':40} {sum(cpu.values()) / hz * 1000 / transactions:10.3f} {sum(switches.values()) / transactions:12.1f}")


if __name__ == "__main__":
    main()
