"""schemathesis against the running gateway (fake-engine workers): no 5xx, and every
response matches the documented status codes, content types and schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.conftest import serving

pytestmark = pytest.mark.e2e

CONFIG = """\
models:
  - id: fake
    engine: fake
    max_batch_size: 64
coordinator:
  metrics_port: null
worker:
  metrics_port: null
"""


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    (tmp_path / "fake.yaml").write_text(CONFIG)
    with serving(tmp_path / "serve.log", tmp_path / "fake.yaml", timeout=60) as server:
        st = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
        # A fixed seed keeps CI reproducible; run without --seed locally to explore further.
        run = subprocess.run(
            [st, "run", f"{server.base_url}/openapi.json", "--checks",
             "not_a_server_error,response_schema_conformance,status_code_conformance,"
             "content_type_conformance", "--max-examples", "25", "--seed", "20261128",
             "--request-timeout", "20"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the tree
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "passed" in run.stdout
