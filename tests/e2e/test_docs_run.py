"""Every code block of README.md and docs/ that is meant to run, run as written against a
live `cyllm serve` (the session's server): bash through bash (each `curl` failing on an
error status), Python through the interpreter, the configuration file through the
settings.  A block that is not meant to run says so on the line before it,
``<!-- not run: why -->``; a block with neither fails the first test, so a new example
is run or excused, never forgotten."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.gateway.settings import GatewaySettings
from cyllm.settings import load_settings
from cyllm.worker.settings import WorkerSettings

ROOT = Path(__file__).parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNS = ("bash", "python", "yaml")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
EXCUSE = re.compile(r"<!-- not run: (.+?) -->\s*$")
# Each curl fails on an error status (printing the body), as a reader would notice one.
PRELUDE = 'curl() { command curl --fail-with-body --max-time 900 "$@"; }\n'


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int
    language: str
    code: str
    excuse: str | None

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            line = text[: m.start()].count("\n") + 1
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            excuse = EXCUSE.search(before)
            code = "\n".join(x[len(m[1]) :] for x in m[3].splitlines())
            found.append(Block(doc, line, m[2], code, excuse[1] if excuse else None))
    return found


RUNNABLE = [b for b in blocks() if b.language in RUNS and b.excuse is None]


def test_every_code_block_runs_or_says_why_not():
    unmarked = [b.name for b in blocks() if b.language not in RUNS + ("",) and b.excuse is None]
    assert unmarked == [], f"a block in a language the runner does not know: {unmarked}"
    for b in blocks():
        if b.excuse and b.excuse.startswith("run by "):
            assert (ROOT / b.excuse.removeprefix("run by ").split()[0].split("::")[0]).is_file(), b.name
    assert len(RUNNABLE) >= 7, [b.name for b in RUNNABLE]


@pytest.fixture
def place(tmp_path, monkeypatch):
    """Where a block runs: a fresh folder with the repository's example data (``tests/data``)."""
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_the_block_runs_as_written(block, server, place):
    host = server.base_url.removeprefix("http://")
    code = block.code.replace("http://localhost:8080", server.base_url).replace("localhost:8080", host)
    if block.language == "bash":
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        env["CYLLM_URL"] = server.base_url
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", PRELUDE + code],
            cwd=place,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, (block.name, done.stdout[-3000:], done.stderr[-3000:])
        # A stream that ends in an error, or a job that failed, is a broken example too.
        failed = re.search(r'event: error|"state":\s*"failed"', done.stdout)
        assert failed is None, (block.name, done.stdout[-3000:])
    elif block.language == "python":
        exec(compile(code, block.name, "exec"), {"__name__": "__doc_example__"})
    else:  # a configuration file: every component takes it
        (place / "cyllm.yaml").write_text(code)
        for settings in (GatewaySettings, CoordinatorSettings, WorkerSettings):
            load_settings(settings, place / "cyllm.yaml")
