"""A training job's processes: its process group and every descendant of it (the ranks
torchrun starts each begin a session of their own, outside the group), found in Linux's
/proc — what cancel, the memory limit and giving way to inference reach."""

from __future__ import annotations

import contextlib
import os


def job_processes(pgid: int) -> list[int]:
    """The job's processes: its process group ``pgid`` and every descendant of it — the
    ranks torchrun starts each begin a session of their own, outside the group (Linux's
    /proc; one pass)."""
    parent: dict[int, int] = {}
    members: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        if int(fields[2]) == pgid:
            members.append(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(members), list(members)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return sorted(found)


def signal_job(pgid: int, sig: int) -> None:
    """``sig`` to every process of the job (its group, and descendants outside it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    for pid in job_processes(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def group_memory(pgid: int) -> int:
    """Resident bytes of every process of the job (``job_processes``)."""
    page, total = os.sysconf("SC_PAGE_SIZE"), 0
    for pid in job_processes(pgid):
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * page
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return total
