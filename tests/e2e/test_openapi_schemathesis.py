"""schemathesis against the running gateway (fake-engine workers): no 5xx, and every
response matches the documented status codes, content types and schemas — once open on
loopback, once with auth on and an ordinary (non-admin) key, as a tenant would call it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.e2e.conftest import serving

# The control-route rate limit (120/min) would answer most generated calls with a 429
# before they reach a handler: off here, so the fuzz reaches the code behind it.
CONFIG = """\
models:
  - id: fake
    engine: fake
    max_batch_size: 64
coordinator:
  metrics_port: null
worker:
  metrics_port: null
gateway:
  rate_limit_control_rpm: null
"""


@pytest.mark.parametrize("auth", [False, True], ids=["open", "auth-on-tenant-key"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path, auth):
    config = tmp_path / "fake.yaml"
    headers = []
    if auth:
        config.write_text(CONFIG + f"  auth_enabled: true\n  api_keys_file: {tmp_path / 'keys.json'}\n")
        made = subprocess.run(
            [sys.executable, "-m", "cyllm", "keys", "create", "--name", "fuzz", "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
        )
        headers = ["-H", f"Authorization: Bearer {made.stdout.split()[-1]}"]
    else:
        config.write_text(CONFIG)
    with serving(tmp_path / "serve.log", config, timeout=60) as server:
        st = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
        # A fixed seed keeps CI reproducible; run without --seed locally to explore further.
        run = subprocess.run(
            [
                st,
                "run",
                f"{server.base_url}/openapi.json",
                "--checks",
                "not_a_server_error,response_schema_conformance,status_code_conformance,"
                "content_type_conformance",
                "--max-examples",
                "25",
                "--seed",
                "20261128",
                "--request-timeout",
                "20",
                *headers,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )  # its cache stays out of the tree
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "passed" in run.stdout
