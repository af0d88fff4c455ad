"""Which process owns an MLflow run, and whether that process still lives.

Every run the runner opens carries the tags of `owner_tags()`: the host name, the pid and the
process's start time (field 22 of /proc/<pid>/stat, in clock ticks since boot, prefixed with
the boot id), so a pid reused by another process, or the same pid after a reboot, is not
mistaken for the owner. `owner_state` reads them back: `alive`, `dead` (this host, the
process is gone), `other-host` (cannot be told from here) or `unknown` (no owner tags).
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional

HOST_TAG, PID_TAG, START_TAG = "runner.owner.host", "runner.owner.pid", "runner.owner.start"
ALIVE, DEAD, OTHER_HOST, UNKNOWN = "alive", "dead", "other-host", "unknown"


@lru_cache(maxsize=1)
def host_name() -> str:
    return socket.gethostname()


@lru_cache(maxsize=1)
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> Optional[str]:
    """`<boot id>:<start ticks>` of a live process, or None when there is no such process.
    Without /proc (not Linux): `?` for a process that answers signal 0."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return _signal_probe(pid)
    fields = stat[stat.rindex(")") + 2:].split()  # the name (field 2) may hold spaces
    return f"{_boot_id()}:{fields[19]}"


def _signal_probe(pid: int) -> Optional[str]:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "?"
    return "?"


def owner_tags() -> dict[str, str]:
    pid = os.getpid()
    return {HOST_TAG: host_name(), PID_TAG: str(pid), START_TAG: process_start(pid) or "?"}


def owner_state(tags: Mapping[str, str]) -> str:
    host, pid, start = tags.get(HOST_TAG), tags.get(PID_TAG), tags.get(START_TAG)
    if not host or not pid or not pid.isdigit():
        return UNKNOWN
    if host != host_name():
        return OTHER_HOST
    now = process_start(int(pid))
    if now is None:
        return DEAD
    return ALIVE if "?" in (now, start) or now == start else DEAD


def describe(tags: Mapping[str, str]) -> str:
    return f"pid {tags.get(PID_TAG, '?')} on {tags.get(HOST_TAG, '?')}"


def pid_alive(pid: int) -> bool:
    return process_start(pid) is not None
