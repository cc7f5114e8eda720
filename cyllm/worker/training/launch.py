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


def main() -> None:
    """Also each rank of a job of several processes: torchrun starts this, which becomes
    the trainer, so no rank outlives torchrun."""
    if sys.platform.startswith("linux"):
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if parent == 1 or os.getppid() != parent:  # the parent died before prctl took effect
            sys.exit(1)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
