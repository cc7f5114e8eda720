"""``cyllm serve``: the embedded default, all three components on one machine.

Two processes talking gRPC over loopback: the gateway, hosting the coordinator
(``cyllm gateway --embed-coordinator``: generations reach it without a network hop, and
its gRPC server takes the worker's registration and the tools' calls), and the worker
(``cyllm worker``), whose engine a crash or the kernel's OOM killer may take away
without taking the HTTP front with it.  A distributed deployment runs the same two
kinds of process (docs/deployment.md); a coordinator may also run alone
(``cyllm coordinator``) for gateways that call it over gRPC.

The internal plane is authenticated here too: unless the config names credentials,
the supervisor makes a random token for this run and hands it to its three children
in their environment (readable only by this user), so another local user who can
reach the loopback ports still cannot call the coordinator or the worker.

What ``cyllm serve`` prints is its own lines (starting, ready, a restart) and the
gateway's log; the worker's output — its engine's start-up (vLLM, torch, compilers) and
its log — goes to ``logs/worker.log`` beside the state file (the previous run's kept as
``worker.log.1``), and a worker that exits has the last lines of it printed.
``--log-level debug`` lets everything through instead.

A component that dies is restarted (with a growing pause, logged) while the others
keep running: a worker killed by the kernel for memory must not take the gateway
down with it.  One that keeps dying (``MAX_RESTARTS`` within ``RESTART_WINDOW_S``)
stops the whole run with its exit code.  SIGINT/SIGTERM stop them all, by pid.

The gateway follows the worker onto the cores the worker keeps to once its engine has
bound its own (``cyllm.cores``): on one machine both wake for every token.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cyllm import cores
from cyllm.protocol.plane import InternalSettings
from cyllm.runtime import LOG_LEVEL_ENV
from cyllm.settings import ConfigError, load_settings
from cyllm.worker.settings import ModelSpec

MAX_RESTARTS = 5
RESTART_WINDOW_S = 120.0
CONFIG_ERROR = 2  # what the cyllm command exits with on a bad setting


def _cmd(component: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "cyllm", component, *args]


@dataclass
class Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)  # when, within the window
    due: float = 0.0  # a restart waits until then
    cores: frozenset[int] = frozenset()  # what it was pinned to, if anything
    log: Path | None = None  # where its output goes (None: through, with serve's own)
    offset: int = 0  # where this run's output starts in the log

    def start(self, env: dict[str, str]) -> None:
        if self.log is None:
            self.proc = subprocess.Popen(self.cmd, env=env)
        else:  # this user's alone, as the state beside it; unbuffered, so a kill loses nothing
            fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as out:
                self.offset = out.seek(0, os.SEEK_END)
                self.proc = subprocess.Popen(
                    self.cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT
                )
        self.cores = frozenset()

    def said(self, most: int = 60) -> str:
        """What this run wrote to its log that explains its exit: from its first traceback
        or error (engines print the cause above their last words), else its last lines."""
        if self.log is None:
            return ""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(self.offset, f.seek(0, os.SEEK_END) - (256 << 10)))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        first = next((i for i, x in enumerate(lines) if "Traceback" in x or " ERROR " in x), None)
        shown = lines[first:] if first is not None else lines[-20:]
        if len(shown) > most:  # the cause's start and the last words, not all between
            shown = [*shown[:10], "…", *shown[-(most - 11) :]]
        return "\n".join(f"  | {line}" for line in shown)


def internal_env(config: Path | None) -> dict[str, str]:
    """The children's environment: a fresh internal token unless credentials are configured."""
    env = dict(os.environ)
    try:
        load_settings(InternalSettings, config)
    except ConfigError:  # none configured: this run's own secret
        env["CYLLM_INTERNAL_TOKEN"] = secrets.token_urlsafe(32)
    return env


def run(
    host: str,
    port: int,
    coordinator_port: int,
    worker_port: int,
    config: Path | None,
    models: list[ModelSpec] | None = None,
) -> int:
    """``models``: what the worker serves instead of the config's (``cyllm serve MODEL``)."""
    cfg = ["--config", str(config)] if config else []
    coordinator = f"127.0.0.1:{coordinator_port}"
    children = [
        Child(
            "gateway",
            _cmd("gateway", "--host", host, "--port", str(port), "--embed-coordinator", coordinator, *cfg),
        ),
        Child(
            "worker",
            _cmd(
                "worker",
                "--host",
                "127.0.0.1",
                "--port",
                str(worker_port),
                "--coordinator",
                coordinator,
                *cfg,
            ),
        ),
    ]
    env = internal_env(config)
    children[1].log = _worker_log(config)
    print(
        f"cyllm serve: starting; the worker's and its engine's output go to {children[1].log}"
        if children[1].log
        else "cyllm serve: starting",
        file=sys.stderr,
        flush=True,
    )
    if models is not None:  # the environment wins over the config file's models
        env["CYLLM_WORKER_MODELS"] = json.dumps(
            [m.model_dump(mode="json", exclude_defaults=True) for m in models]
        )
    stopping = False

    def _stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = 0
    ready = Ready(host, port, _served(models, config), _tls(config))
    try:
        for child in children:
            child.start(env)
        while not stopping:
            for child in children:
                code = _watch(child, env)
                if code:
                    stopping = True
                    break
            _follow(*children)
            ready.check()
            time.sleep(0.2)
    finally:
        _terminate([c.proc for c in reversed(children) if c.proc is not None])
    return code


class Ready:
    """Says once, when the stack first answers healthy, where it listens and what it
    serves: the line a user waits for among the components' logs."""

    def __init__(self, host: str, port: int, models: list[str], tls: bool = False) -> None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        if ":" in shown:  # an IPv6 address
            shown = f"[{shown}]"
        self.base = f"{'https' if tls else 'http'}://{shown}:{port}"
        self.models = models
        self.said = False
        self.next = 0.0

    def check(self) -> None:
        if self.said or time.monotonic() < self.next:
            return
        self.next = time.monotonic() + 1.0
        import httpx

        try:  # the local server itself: no proxy, its own certificate
            health = httpx.get(f"{self.base}/api/v1/health", timeout=2, trust_env=False, verify=False)
        except Exception:  # not up yet, or never answering: the line is a courtesy, never fatal
            return
        models = self.models
        if health.status_code != 200:
            return
        self.said = True
        print(
            f"cyllm serve: ready on {self.base} (OpenAI API {self.base}/v1, console {self.base}/console)"
            + (f", serving {', '.join(sorted(set(models)))}" if models else ""),
            file=sys.stderr,
            flush=True,
        )


def _worker_log(config: Path | None) -> Path | None:
    """``logs/worker.log`` beside the coordinator's state file, the last run's moved to
    ``worker.log.1``; None (the output through) at ``--log-level debug``."""
    if os.environ.get(LOG_LEVEL_ENV, "").upper() == "DEBUG":
        return None
    from cyllm.coordinator.settings import CoordinatorSettings

    try:
        state = load_settings(CoordinatorSettings, config).state_db
    except ConfigError:
        return None  # the gateway child says what is wrong with the file
    log = Path(state).expanduser().parent / "logs" / "worker.log"
    try:
        log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if log.exists():
            log.replace(log.with_name("worker.log.1"))
    except OSError:
        return None
    return log


def _tls(config: Path | None) -> bool:
    from cyllm.gateway.settings import GatewaySettings

    try:
        return load_settings(GatewaySettings, config).tls_cert_file is not None
    except ConfigError:
        return False


def _served(models: list[ModelSpec] | None, config: Path | None) -> list[str]:
    """The models the worker is given (the command's, else the config's)."""
    if models is None:
        from cyllm.worker.settings import WorkerSettings

        try:
            models = load_settings(WorkerSettings, config).models
        except ConfigError:
            return []
    return [m.id for m in models]


def _watch(child: Child, env: dict[str, str]) -> int:
    """Restart ``child`` if it has died; non-zero when it has died too often."""
    now = time.monotonic()
    if child.proc is None:
        if now >= child.due:
            print(f"cyllm serve: restarting {child.name}", file=sys.stderr, flush=True)
            child.start(env)
        return 0
    rc = child.proc.poll()
    if rc is None:
        return 0
    child.proc = None
    recent = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
    if not recent and (said := child.said()):  # once per run of failures, not at each restart
        print(f"cyllm serve: {child.name} exited; from {child.log}:\n{said}", file=sys.stderr, flush=True)
    if rc == CONFIG_ERROR:  # restarting cannot help
        print(f"cyllm serve: {child.name} refused its configuration; stopping", file=sys.stderr, flush=True)
        return rc
    child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
    if len(child.restarts) > MAX_RESTARTS:
        print(
            f"cyllm serve: {child.name} exited with code {rc}, {MAX_RESTARTS} restarts in "
            f"{RESTART_WINDOW_S:.0f}s; stopping",
            file=sys.stderr,
            flush=True,
        )
        return rc or 1
    pause = min(30.0, 2.0 ** (len(child.restarts) - 1))
    child.due = now + pause
    print(
        f"cyllm serve: {child.name} exited with code {rc}; restarting it in {pause:.0f}s",
        file=sys.stderr,
        flush=True,
    )
    return 0


def _follow(gateway: Child, worker: Child) -> None:
    """The gateway on the cores the worker keeps to: the worker leaves its engine's
    cores (``cyllm.cores``), and on one machine the gateway's threads wake for every
    token too."""
    if gateway.proc is None or worker.proc is None:
        return
    want = cores.of(worker.proc.pid)
    if want and want != gateway.cores and cores.pin(gateway.proc.pid, want):
        gateway.cores = want


def _terminate(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
