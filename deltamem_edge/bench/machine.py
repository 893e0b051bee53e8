"""The machine and the commit a run was measured on (recorded with every result).

Shared by `deltamem-edge bench` and `deltamem-edge bench-server`.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess

from .plan import REPO_ROOT


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            cpu = m.group(1).strip()
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "threads": threads, "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": dirty, "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()}
