"""cyllm.cores with real processes: a child bound to fewer cores (as vLLM binds its
compute process) is found, this process's threads move off its cores and back, and a
process started for a job gets every core."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from cyllm import cores

pytestmark = pytest.mark.skipif(len(cores.GIVEN) < 2, reason="needs Linux and two cores")

# A child that binds a grandchild to one core, as vLLM's engine process starts its
# OpenMP worker; both wait for stdin to close.
BINDER = """
import os, subprocess, sys
core = int(sys.argv[1])
grandchild = subprocess.Popen([sys.executable, "-c",
    f"import os, sys; os.sched_setaffinity(0, {{{core}}}); print('bound', flush=True); sys.stdin.read()"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert grandchild.stdout.readline().strip() == "bound"
print("ready", flush=True)
sys.stdin.read()
grandchild.stdin.close()
grandchild.wait()
"""


def _threads_cores() -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}


@pytest.fixture
def engine_on_first_core():
    core = min(cores.GIVEN)
    proc = subprocess.Popen(
        [sys.executable, "-c", BINDER, str(core)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield core
    finally:
        proc.stdin.close()
        proc.wait(10)
        cores.spread()


def test_the_bound_descendant_is_found_and_the_free_one_is_not(engine_on_first_core):
    assert cores.engine_cores() == {engine_on_first_core}


def test_threads_move_off_the_engines_cores_and_back(engine_on_first_core):
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)  # a thread that exists before the move
    helper.start()
    try:
        in_use = cores.keep_off_engines()
        assert in_use == cores.GIVEN - {engine_on_first_core}
        assert _threads_cores() == {in_use}
        later: list[frozenset[int]] = []  # a thread started after inherits the move
        t = threading.Thread(target=lambda: later.append(frozenset(os.sched_getaffinity(0))))
        t.start()
        t.join()
        assert later == [in_use]
    finally:
        stop.set()
        helper.join()
    cores.spread()
    assert _threads_cores() == {cores.GIVEN}


def test_nothing_moves_when_no_engine_is_bound():
    assert cores.engine_cores() == frozenset()
    assert cores.keep_off_engines() == cores.GIVEN
    assert _threads_cores() == {cores.GIVEN}


def test_a_job_started_from_a_narrowed_thread_gets_every_core():
    narrow = frozenset({max(cores.GIVEN)})
    os.sched_setaffinity(0, narrow)
    try:
        with cores.whole_machine():
            child = subprocess.run(
                [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                capture_output=True,
                text=True,
                check=True,
            )
        assert frozenset(os.sched_getaffinity(0)) == narrow  # the serving thread stays put
    finally:
        os.sched_setaffinity(0, cores.GIVEN)
    assert child.stdout.strip() == str(sorted(cores.GIVEN))


def test_a_process_that_is_gone_is_not_pinned():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    time.sleep(0.05)
    assert cores.of(proc.pid) == frozenset()
    assert cores.pin(proc.pid, cores.GIVEN) is False
