"""Run a command so that it dies with the worker: ``python -m cyllm.worker.training.launch
CMD ARGS...`` asks Linux to SIGKILL it when its parent (the worker) exits, then becomes
CMD.  A training job must not outlive a killed worker: the coordinator re-queues the job
elsewhere, and two runs must not write the same checkpoints."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux); exit now if it already has.
    The launched command calls it too in each process it starts for a job (the ranks a
    torchrun starts), so none outlives the job's first process."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            sys.exit(1)


def main() -> None:
    die_with_parent()
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
