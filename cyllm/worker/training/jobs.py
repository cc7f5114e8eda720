"""The worker's side of a training job: resolve the base model, lay out the job folder,
start the job's process (``runner.py``) and turn what it reports into ``TrainingEvent``s.

One job at a time per worker.  While it runs the worker tells the coordinators
(``WorkerInfo.training_job``).  By default it keeps serving, the job giving way to each
inference call (``sharing.py``); with ``worker.training_shares_device`` off the
coordinators send it no inference while it trains.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from cyllm import errors
from cyllm.paths import checked_id, inside
from cyllm.protocol import pb
from cyllm.training.spec import TrainingSpec
from cyllm.worker import model_files
from cyllm.worker.devices import device_count
from cyllm.worker.engines import compute_thread
from cyllm.worker.settings import WorkerSettings
from cyllm.worker.training.runner import run_process
from cyllm.worker.training.sharing import Demand, Yielding

log = logging.getLogger(__name__)

# What a training job's process imports beyond the worker's model runtime.
TRAINING_PACKAGES = ("accelerate", "datasets", "peft")


class WorkerTraining:
    def __init__(
        self,
        settings: WorkerSettings,
        catalog: Callable[[], dict],
        accelerator: str,
        on_change: Callable[[], None],
    ) -> None:
        self.settings = settings
        self._catalog = catalog
        self.accelerator = accelerator
        self._on_change = on_change
        self.current = ""  # the running job's id
        self.demand = Demand()  # the worker's inference calls, which a job gives way to

    @property
    def unavailable(self) -> str:
        """Why this worker takes no training job ('' when it takes them)."""
        if not self.settings.training_enabled:
            return "worker.training_enabled is false"
        missing = [p for p in TRAINING_PACKAGES if importlib.util.find_spec(p) is None]
        if missing:
            return (
                f"the training packages are not installed ({', '.join(missing)}); pip install 'cyllm[train]'"
            )
        return ""

    @property
    def memory_limit(self) -> int:
        """What a job's processes may hold together (``worker.training_memory_gib``)."""
        if self.settings.training_memory_gib is not None:
            return int(self.settings.training_memory_gib * (1 << 30))
        return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    @property
    def root(self) -> Path:
        return self.settings.training_dir or self.settings.cache_dir / "training"

    @functools.cached_property
    def devices(self) -> int:
        """The processes a job may run here (``devices.device_count``; counted once, as
        every registration reports it; 1 when the count fails)."""
        d = self.settings.training_device
        try:
            return max(1, device_count(self.accelerator if d == "auto" else d))
        except Exception:  # no torch, or a device the driver cannot count
            log.warning("could not count the training devices of %s; counting one", d, exc_info=True)
            return 1

    @property
    def device(self) -> str:
        d = self.settings.training_device
        if d != "auto":
            return d
        return {"cuda": "cuda:0", "npu": "npu:0"}.get(self.accelerator, "cpu")

    async def train(self, request: pb.TrainRequest) -> AsyncGenerator[pb.TrainingEvent, None]:
        if why := self.unavailable:
            raise errors.Unavailable(f"this worker does not train: {why}")
        if self.current:
            raise errors.Overloaded(f"this worker is running training job {self.current}")
        spec = self._placed(TrainingSpec.parse(request.spec_json))
        base = self._catalog().get(spec.base_model)
        if base is None:
            raise errors.ModelNotFound(
                f"base model {spec.base_model!r} is not in this worker's catalog", param="base_model"
            )
        out = self.root / checked_id(request.job_id, "job_id", "job_id")
        resume = str(inside(out, request.resume_from, "resume_from")) if request.resume_from else ""
        out.mkdir(parents=True, exist_ok=True)
        spec_doc = spec.model_dump(mode="json")
        base_path = await self._base_path(base)
        job = {
            "spec": spec_doc,
            "output_dir": str(out),
            "device": self.device,
            "resume_from": resume,
            "threads": self.settings.training_threads,
            "base_model_path": base_path,
            "formatters": self.settings.dataset_formatters,
            "eval_tasks_dir": str(self.settings.eval_tasks_dir or ""),
            "eval_builtin_tasks": self.settings.eval_builtin_tasks,
        }
        if request.incumbent_json:
            job["incumbent"] = _incumbent(request.incumbent_json, spec.base_model)
        (out / "job.json").write_text(json.dumps(job, indent=1))
        argv = self._command(spec, out)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "CYLLM_JOB_ID": request.job_id,
            "CYLLM_DATASET": spec.dataset,
            "CYLLM_DATASET_FORMAT": spec.dataset_format or "",
            "CYLLM_BASE_MODEL": base_path,
            "CYLLM_BASE_MODEL_ID": spec.base_model,
            "CYLLM_OUTPUT_DIR": str(out),
            "CYLLM_RESUME_FROM": resume,
            "CYLLM_DEVICE": self.device,
            "CYLLM_SPEC": json.dumps(spec_doc),
        }
        self.current = request.job_id
        self._on_change()
        log.info("training job %s started (%s on %s)", request.job_id, spec.method, self.device)
        try:
            async for event in run_process(
                argv,
                env=env,
                cwd=out,
                log_path=out / "job.log",
                time_limit_s=spec.time_limit_s,
                memory_limit_bytes=self.memory_limit,
                yielding=(
                    Yielding(self.demand, self.settings.training_share_under_load, processes=spec.processes)
                    if self.settings.training_shares_device
                    else None
                ),
            ):
                yield to_proto(_confined(event, out))
        finally:
            self.current = ""
            self._on_change()

    def _placed(self, spec: TrainingSpec) -> TrainingSpec:
        """The spec with its processes counted here (devices: all), or InvalidRequest."""
        have = self.devices
        if spec.devices == "all":
            return spec.model_copy(update={"processes": have if self.device != "cpu" else 1})
        if spec.processes > have:
            unit = "CPU cores" if self.device == "cpu" else f"{self.device.split(':')[0]} devices"
            raise errors.InvalidRequest(
                f"processes: {spec.processes}, but this worker has {have} {unit}", param="processes"
            )
        return spec

    async def _base_path(self, base) -> str:
        """The base model's folder (a GGUF converted once); empty for a test double."""
        if base.path is None and base.gguf is None:
            return ""
        try:
            return str(await compute_thread.once(model_files.resolve, base, self.settings.cache_dir))
        except FileNotFoundError as exc:
            raise errors.NotLoadable(f"base model {base.id!r}: {exc}") from exc

    def _command(self, spec: TrainingSpec, out: Path) -> list[str]:
        if spec.method != "custom":
            trainer = [sys.executable, "-m", "cyllm.worker.training.train", str(out / "job.json")]
            if spec.processes == 1:
                return trainer
            # torchrun on this machine (a free rendezvous port of its own); its ranks start
            # sessions of their own, so cancel, limits and giving way reach them as the
            # job's descendants (processes.job_processes), and each dies with torchrun
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={spec.processes}",
                "-m",
                "cyllm.worker.training.launch",  # each rank dies with torchrun, set before its imports
                *trainer,
            ]
        root = self.settings.training_scripts_dir
        if root is None:
            raise errors.Forbidden(
                "custom training scripts are off on this worker (set worker.training_scripts_dir)"
            )
        assert spec.script is not None  # the spec's check: method custom names a script
        script = (root / spec.script).resolve()
        if not script.is_relative_to(root.resolve()) or not script.is_file():
            raise errors.InvalidRequest(
                f"script {spec.script!r} is not a file in the worker's training scripts folder",
                param="script",
            )
        head = [sys.executable, str(script)] if script.suffix == ".py" else [str(script)]
        return head + spec.script_args


def _confined(event: dict, out: Path) -> dict:
    """A result or checkpoint names a folder inside the job's own (a script may print any
    path; what it names is served, exported and, when deleted, removed)."""
    if event.get("event") not in ("result", "checkpoint"):
        return event
    try:
        folder = inside(out, str(event.get("path", "")), "the folder")
    except errors.InvalidRequest:
        folder = out
    if folder == out.resolve():
        return {"event": "log", "message": f"ignored a {event['event']} outside the job's folder"}
    return {**event, "path": str(folder)}


_EVALUATED = {"base": "the base model", "incumbent": "the alias's current target", "result": "the result"}


def _incumbent(raw: str, base: str) -> dict:
    """The coordinator's incumbent: the base itself, or a model made from it."""
    try:
        incumbent = json.loads(raw)
    except json.JSONDecodeError:
        incumbent = None
    if not isinstance(incumbent, dict) or incumbent.get("kind") not in ("base", "adapter", "peft", "model"):
        raise errors.InvalidRequest("incumbent_json: {kind: base|adapter|peft|model, path, model}")
    if incumbent["kind"] != "base" and not isinstance(incumbent.get("path"), str):
        raise errors.InvalidRequest(f"incumbent_json: a {incumbent['kind']} needs its path")
    return {
        "model": str(incumbent.get("model") or base),
        "kind": incumbent["kind"],
        "path": incumbent.get("path"),
    }


def to_proto(event: dict) -> pb.TrainingEvent:
    """A progress-protocol line (or the runner's exit) as a TrainingEvent."""
    now = int(time.time() * 1000)
    kind = event["event"]
    if kind == "progress":
        fields = {
            k: event[k]
            for k in (
                "step",
                "total_steps",
                "epoch",
                "loss",
                "learning_rate",
                "tokens_per_second",
                "eta_s",
                "tokens",
            )
            if isinstance(event.get(k), (int, float))
        }
        fields = {
            k: int(v) if k in ("step", "total_steps", "tokens") else float(v) for k, v in fields.items()
        }
        step, total = fields.get("step", 0), fields.get("total_steps", 0)
        msg = f"step {step}/{total}" + (f": loss {fields['loss']:.4f}" if "loss" in fields else "")
        return pb.TrainingEvent(
            created_at=now, type="metrics", level="info", message=msg, progress=pb.TrainingProgress(**fields)
        )
    if kind == "eval" and isinstance(event.get("eval_loss"), (int, float)):
        step, loss = int(event.get("step") or 0), float(event["eval_loss"])
        return pb.TrainingEvent(
            created_at=now,
            type="eval",
            level="info",
            message=f"step {step}: eval loss {loss:.4f}",
            progress=pb.TrainingProgress(step=step, eval_loss=loss),
        )
    if kind == "evaluation":
        of, scores = event.get("of"), event.get("scores")
        numbers = {
            f"{of}.{k}": float(v)
            for k, v in (scores.items() if isinstance(scores, dict) else ())
            if isinstance(k, str) and len(k) <= 64 and isinstance(v, (int, float)) and math.isfinite(v)
        }
        if of not in ("base", "incumbent", "result") or not numbers:
            return pb.TrainingEvent(
                created_at=now, type="message", level="warn", message="ignored an evaluation without scores"
            )
        said = ", ".join(f"{k.split('.', 1)[1]} {v:.4f}" for k, v in sorted(numbers.items())[:8])
        return pb.TrainingEvent(
            created_at=now,
            type="evaluation",
            level="info",
            message=_EVALUATED[of] + f": {said}",
            scores=dict(sorted(numbers.items())[:32]),
        )
    if kind == "checkpoint":
        step = int(event.get("step") or 0)
        return pb.TrainingEvent(
            created_at=now,
            type="checkpoint",
            level="info",
            message=f"checkpoint at step {step}",
            checkpoint=pb.TrainingCheckpoint(
                step=step, path=str(event.get("path", "")), created_at=now // 1000
            ),
        )
    if kind == "result":
        result_kind = str(event.get("kind", ""))
        if result_kind not in ("adapter", "peft", "model"):
            return pb.TrainingEvent(
                created_at=now,
                type="message",
                level="warn",
                message=f"ignored a result of unknown kind {result_kind!r}",
            )
        return pb.TrainingEvent(
            created_at=now,
            type="result",
            level="info",
            message=f"{result_kind} saved to {event.get('path')}",
            result_kind=result_kind,
            result_path=str(event.get("path", "")),
            trained_tokens=int(event.get("trained_tokens") or 0),
        )
    if kind == "exit":
        ok = event["code"] == 0 and not event.get("error")
        return pb.TrainingEvent(
            created_at=now,
            type="state",
            level="info" if ok else "error",
            state="succeeded" if ok else "failed",
            message="training finished" if ok else event["error"],
        )
    level = "error" if kind == "error" else "info"
    return pb.TrainingEvent(
        created_at=now, type="message", level=level, message=str(event.get("message", ""))[:2000]
    )
