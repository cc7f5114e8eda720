"""A dataset read in a child process under a memory and time limit:

    python -m cyllm.training.check   (a JSON request on stdin, a JSON answer on stdout)

The coordinator checks every upload and every job's dataset before accepting it (a Hub
dataset is fetched here first, ``hub.py``).  The
caps of ``data.Limits`` stop the known ways a small file becomes a large one; this
process boundary stops the unknown ones: a reader that still blows up hits its
address-space limit (or the time limit) and dies alone, and the caller answers 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from cyllm.training.data import DatasetError, Limits, Reading, load_records
from cyllm.training.hub import fetch, forget


@dataclass(frozen=True)
class Hub:
    """Fetch the dataset from the Hub first: ``repo`` at ``revision`` into ``cache_dir``."""

    repo: str
    revision: str | None
    cache_dir: str


@dataclass(frozen=True)
class Checked:
    examples: int
    path: str  # where it was read (a Hub dataset: its local folder)


async def check_dataset(
    path: str,
    reading: Reading,
    limits: Limits,
    *,
    memory_bytes: int,
    timeout_s: float,
    objective: str | None = None,
    hub: Hub | None = None,
) -> Checked:
    """How many records the dataset has, or DatasetError (also when the reader ran out
    of memory or time).  ``objective``: the records must be of a kind it trains on (None:
    any one kind, as an upload before a job names it)."""
    request = json.dumps(
        {
            "path": path,
            "reading": dataclasses.asdict(reading),
            "objective": objective,
            "limits": dataclasses.asdict(limits),
            "memory_bytes": memory_bytes,
            "hub": dataclasses.asdict(hub) if hub else None,
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cyllm.training.check",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(request.encode()), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DatasetError(f"the dataset took longer than {timeout_s:.0f}s to read") from None
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    try:
        answer = json.loads(out)
    except json.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):  # killed: out of memory, most likely
        raise DatasetError(
            f"the dataset needs more than {memory_bytes >> 20} MiB to read (its reader ran out of memory)"
        )
    if "error" in answer:
        raise DatasetError(str(answer["error"]))
    return Checked(int(answer["examples"]), str(answer["path"]))


def main() -> None:
    request = json.loads(sys.stdin.read())
    # The limit is set before the dataset is opened (and not with preexec_fn, which is
    # unsafe in the coordinator's threaded process).
    memory = int(request["memory_bytes"])
    answer: dict[str, int | str]
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        limits = Limits(**request["limits"])
        path = request["path"]
        fetched = folder = None
        if hub := request.get("hub"):
            folder, fresh = fetch(hub["repo"], hub["revision"], Path(hub["cache_dir"]), limits)
            path, fetched = str(folder), folder if fresh else None
        raw = request["reading"]
        reading = Reading(**{**raw, "formatters": tuple(raw["formatters"])})
        try:
            examples = load_records(path, reading, request.get("objective"), limits=limits)
        except BaseException as exc:
            if fetched is not None:  # a refused Hub dataset is not kept
                forget(fetched, Path(hub["cache_dir"]))
            if folder is not None and isinstance(exc, DatasetError):  # named as the user named it
                raise DatasetError(exc.message.replace(folder.name, f"hf://{hub['repo']}")) from None
            raise
        answer = {"examples": len(examples), "path": path}
    except DatasetError as exc:
        answer = {"error": exc.message}
    except MemoryError:
        answer = {"error": "the dataset is too large to read within this server's memory limit"}
    except Exception as exc:  # a reader's own failure on hostile data: refused, not a crash
        answer = {"error": f"the dataset could not be read ({type(exc).__name__}: {str(exc)[:200]})"}
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
