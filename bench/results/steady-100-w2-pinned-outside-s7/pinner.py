"""Experiment only: pin each fleet-ingress worker whose environment has PIN_ME=1
to its own CPU (worker i -> CPU i mod n, by pid order under its supervisor)."""

import os
import sys
import time

end = time.time() + float(sys.argv[1])
pinned = set()
while time.time() < end:
    sups = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            if b"worker" not in cmd or not any(b"fleet_ingress" in c for c in cmd):
                continue
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            if b"PIN_ME=1" not in env:
                continue
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            sups.setdefault(ppid, []).append(int(pid))
        except OSError:
            continue
    for pids in sups.values():
        for i, pid in enumerate(sorted(pids)):
            if pid in pinned:
                continue
            try:
                os.sched_setaffinity(pid, {i % os.cpu_count()})
                pinned.add(pid)
                print("pinned", pid, "->", i % os.cpu_count(), flush=True)
            except OSError:
                pass
    time.sleep(0.3)
