"""Keeping the serving processes off the cores an engine computes on.

vLLM on a CPU binds its OpenMP threads to chosen cores (``VLLM_CPU_OMP_THREADS_BIND``;
its default leaves one core per engine for everything else) and every decode step
waits for all of them at each barrier: a gRPC, HTTP or event-loop thread woken on one
of those cores for a token stalls the whole step.  So after a model loads, the worker
moves its own threads to the cores its engines' processes are not bound to, and
``cyllm serve`` moves the gateway after it.  Measured on 2 cores (docs/benchmarks.md):
with the frontends left floating, one stream ran at 0.88x of ``vllm serve``; kept off
the engine's core, 1.03x.

Read from what the engine's processes were actually given (``/proc``), not from the
engine's rules for choosing, so a user's own ``cpu_threads_bind`` is followed too.
Linux only; elsewhere every function here does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

_SUPPORTED = hasattr(os, "sched_setaffinity") and os.path.isdir("/proc/self/task")
# The cores this process was started with: what is given back when nothing is bound.
GIVEN: frozenset[int] = frozenset(os.sched_getaffinity(0)) if _SUPPORTED else frozenset()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def engine_cores() -> frozenset[int]:
    """Cores that a descendant of this process is bound to, where that binding is
    narrower than what this process was given: the cores an engine's threads compute on."""
    if not _SUPPORTED:
        return frozenset()
    bound: set[int] = set()
    todo = _children(os.getpid())
    while todo:
        child = todo.pop()
        try:
            cores = frozenset(os.sched_getaffinity(child))
        except OSError:  # gone since it was listed
            continue
        if cores < GIVEN:
            bound |= cores
        todo += _children(child)
    return frozenset(bound)


def pin(pid: int, cores: frozenset[int]) -> bool:
    """Every thread of ``pid`` on ``cores`` (threads it starts later inherit it); False
    when the process is gone or refuses."""
    if not _SUPPORTED or not cores:
        return False
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return False
    done = False
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cores)
            done = True
        except OSError:  # a thread that ended meanwhile, or a core outside our cpuset
            continue
    return done


def of(pid: int) -> frozenset[int]:
    """The cores ``pid``'s main thread may run on; empty when it is gone (or off Linux)."""
    if not _SUPPORTED:
        return frozenset()
    try:
        return frozenset(os.sched_getaffinity(pid))
    except OSError:
        return frozenset()


def keep_off_engines() -> frozenset[int]:
    """Move this process's threads to the cores its engines are not bound to (all it was
    given when none are, or when they are bound to every core); the cores now in use."""
    if not _SUPPORTED:
        return frozenset()
    free = GIVEN - engine_cores()
    cores = frozenset(free) if free else GIVEN
    if cores != frozenset(os.sched_getaffinity(0)):
        pin(os.getpid(), cores)
        log.info(
            "worker threads on cores %s (engines on %s)", _describe(cores), _describe(GIVEN - cores) or "none"
        )
    return cores


def spread() -> None:
    """Every thread of this process back on every core it was given (before starting an
    engine, which chooses its cores from what its process may use)."""
    if _SUPPORTED and frozenset(os.sched_getaffinity(0)) != GIVEN:
        pin(os.getpid(), GIVEN)


@contextlib.contextmanager
def whole_machine() -> Iterator[None]:
    """The calling thread on every given core for the block, so a process it starts (a
    training job) does not inherit the serving threads' narrow set."""
    if not _SUPPORTED:
        yield
        return
    before = frozenset(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, GIVEN)
        widened = True
    except OSError:  # the cpuset shrank since start: the job starts as this thread is
        widened = False
    try:
        yield
    finally:
        if widened:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, before)


def _describe(cores: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cores)))
