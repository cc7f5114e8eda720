"""What a worker serves: its catalog (the models in its config), the engines loaded now,
their LoRA adapters, and the memory they take.

- ``load`` estimates the model first; when it does not fit, idle loaded models are
  unloaded least recently used first; when it still does not fit, InsufficientMemory
  says how much is needed and free.
- ``"<base>:<adapter>"`` ids are adapters on a loaded base model (loaded with it when
  the base is not loaded yet); an adapter needs no room of its own in the accounting.
- ``unload`` stops new requests at once, lets running ones finish (bounded), then closes.

Loads and unloads run one at a time; generation goes on meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cyllm import cores, errors
from cyllm.paths import inside
from cyllm.protocol import pb
from cyllm.worker import memory
from cyllm.worker.convert import card_to_proto
from cyllm.worker.engines import compute_thread
from cyllm.worker.engines.base import AbstractEngine
from cyllm.worker.engines.factory import (
    ENGINES,
    create_engine,
    engine_for_new_weights,
    resolve_engine_name,
)
from cyllm.worker.engines.types import ModelCard
from cyllm.worker.settings import ModelSpec, WorkerSettings

log = logging.getLogger(__name__)
LORA_SLOTS_ON_DEMAND = 4  # a base started again for adapters: room for this many in a batch
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM takes


@dataclass
class Loaded:
    spec: ModelSpec
    engine: AbstractEngine
    card: ModelCard
    estimate: memory.Estimate
    last_used: float = field(default_factory=time.monotonic)
    adapters: dict[str, Path] = field(default_factory=dict)
    adapter_used: dict[str, float] = field(default_factory=dict)  # adapter -> last used


def split_id(model: str) -> tuple[str, str | None]:
    base, _, adapter = model.partition(":")
    return base, adapter or None


class ModelManager:
    def __init__(
        self, settings: WorkerSettings, device_type: str, on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.settings = settings
        self.catalog: dict[str, ModelSpec] = {m.id: m for m in settings.models}
        self.configured = frozenset(self.catalog)  # the rest was registered at run time
        self.keep_alive: dict[str, float] = {}  # model (or base:adapter) -> seconds, as loaded
        self.unloaded_adapters: dict[str, Path] = {}  # base:adapter -> its folder, gone idle
        self.loaded: dict[str, Loaded] = {}
        self.budget = memory.MemoryBudget(device_type, settings.memory_limit_gib, settings.memory_fraction)
        self.on_change = on_change
        self._lock = asyncio.Lock()
        self._no_slots: set[str] = set()  # bases that failed to start with LoRA slots

    # -- serving ----------------------------------------------------------------------

    def engines(self) -> dict[str, AbstractEngine]:
        return {mid: m.engine for mid, m in self.loaded.items()}

    async def resolve_or_load(self, model: str) -> tuple[AbstractEngine, str | None]:
        """``resolve``, loading first what this worker unloaded for going unused (a
        request can come just before the coordinators hear it went: the worker takes it
        as a load on demand)."""
        try:
            return self.resolve(model)
        except errors.ModelNotFound:
            base, adapter = split_id(model)
            if base not in self.catalog or (adapter is not None and model not in self.unloaded_adapters):
                raise
        await self.load(model, self.unloaded_adapters.get(model), self.keep_alive.get(model))
        return self.resolve(model)

    def resolve(self, model: str) -> tuple[AbstractEngine, str | None]:
        """The engine and adapter for a request's model id (and mark it used)."""
        base, adapter = split_id(model)
        entry = self.loaded.get(base)
        if entry is None or (adapter is not None and adapter not in entry.adapters):
            state = (
                "is in this worker's catalog but not loaded"
                if base in self.catalog
                else "is not served by this worker"
            )
            raise errors.ModelNotFound(f"model {model!r} {state}", param="model")
        entry.last_used = time.monotonic()
        if adapter is not None:
            entry.adapter_used[adapter] = entry.last_used
        return entry.engine, adapter

    # -- loading ----------------------------------------------------------------------

    async def start(self) -> None:
        for spec in self.settings.models:
            if spec.preload:
                await self.load(spec.id)

    def estimate(self, spec: ModelSpec) -> memory.Estimate:
        from cyllm.worker import model_files

        name = resolve_engine_name(spec, self.settings.cpu_engine)
        entry = ENGINES[name]
        if not entry.holds_weights:
            return memory.Estimate(0, 0)  # in a server (MindIE), in members, or nowhere
        if entry.source == "gguf":
            return memory.estimate_gguf(
                spec.model_copy(update={"engine": name}), model_files.gguf_source(spec)
            )
        folder = model_files.resolve(spec, self.settings.cache_dir)
        return memory.estimate_folder(
            spec.model_copy(update={"engine": name}),
            folder,
            self.budget.device_type,
            self.budget.device_total,
        )

    async def load(
        self, model: str, adapter_path: Path | None = None, keep_alive_s: float | None = None
    ) -> list[str]:
        """Load ``model`` (a catalog id or ``base:adapter``); return what was evicted.
        ``keep_alive_s``: how long it may stay unused (0: for ever; None: its spec's)."""
        base, adapter = split_id(model)
        async with self._lock:
            evicted: list[str] = []
            if base not in self.loaded:
                evicted = await self._load_base(base)
            if adapter is not None:
                if self.loaded[base].engine.adapters_need_restart and base not in self._no_slots:
                    evicted += await self._restart_with_lora_slots(base, adapter_path)
                await self._add_adapter(base, adapter, adapter_path)
                self.loaded[base].adapter_used[adapter] = time.monotonic()
            if keep_alive_s is not None:
                self.keep_alive[model] = keep_alive_s
        self.on_change()
        return evicted

    def idle(self, now: float | None = None) -> list[str]:
        """Loaded models and adapters unused for longer than they may stay (none running)."""
        now = time.monotonic() if now is None else now
        out = []
        for mid, entry in self.loaded.items():
            keep = self.keep_alive.get(mid, entry.spec.keep_alive_s)
            if keep and now - entry.last_used > keep and not entry.engine.health().running:
                out.append(mid)
            for name in entry.adapters:
                keep = self.keep_alive.get(f"{mid}:{name}", 0.0)
                busy = entry.engine.health().running  # the engine does not say which adapter runs
                if keep and now - entry.adapter_used.get(name, entry.last_used) > keep and not busy:
                    out.append(f"{mid}:{name}")
        return out

    async def unload_idle(self) -> list[str]:
        """Unload what ``idle`` names; a request later loads it again (the coordinator)."""
        gone = []
        for model in self.idle():
            base, adapter = split_id(model)
            if adapter is not None and base in self.loaded:
                self.unloaded_adapters[model] = self.loaded[base].adapters[adapter]
            try:
                await self.unload(model)
            except errors.ModelNotFound:
                continue  # unloaded meanwhile
            log.info("model %s unloaded: unused past its keep-alive", model)
            gone.append(model)
        return gone

    async def forget(self, model: str, path: Path | None, root: Path) -> bool:
        """``model`` is gone for good: unloaded if loaded, out of the catalog if it was
        registered here, and its artefact ``path`` deleted if it lies under ``root``
        (this worker's own training folder).  True when the artefact was deleted."""
        base, adapter = split_id(model)
        entry = self.loaded.get(base)
        if entry is not None and (adapter is None or adapter in entry.adapters):
            await self.unload(model)
        if adapter is None and model in self.catalog and model not in self.configured:
            del self.catalog[model]
            self.on_change()
        self.keep_alive.pop(model, None)
        self.unloaded_adapters.pop(model, None)
        if path is None:
            return False
        folder = await asyncio.to_thread(_artefact_folder, root, path)
        if folder is None:
            return False
        await asyncio.to_thread(shutil.rmtree, folder)
        return True

    @property
    def lora_slots(self) -> int:
        """Adapters a base may run beside it where the engine must say so at start (vLLM):
        ``worker.lora_slots``, by default none (they cost every request: vllm_engine.py)."""
        return self.settings.lora_slots or 0

    async def _restart_with_lora_slots(self, base: str, adapter: Path | None) -> list[str]:
        """Start ``base`` again with LoRA slots for its first adapter: its running requests
        finish first (up to ``drain_timeout_s``), requests that come meanwhile wait for it
        (``resolve_or_load``), so none fails — it costs them the restart's latency, once
        in the worker's life (after a fine-tune on this worker the base is idle anyway:
        the worker was training).  What it evicts is returned."""
        entry = self.loaded[base]
        adapters = dict(entry.adapters)
        slots = max(LORA_SLOTS_ON_DEMAND, len(adapters) + 2)
        rank = await asyncio.to_thread(_lora_rank, adapter)
        if rank is None:  # not an adapter vLLM could hold in a slot: served another way
            return []
        log.info("model %s: starting it again with %d LoRA slots for its first adapter", base, slots)
        await self._unload_base(base, drain_s=self.settings.drain_timeout_s)
        before = self.catalog[base]
        update: dict = {"lora_slots": slots}
        if rank > VLLM_LORA_RANKS[2]:  # vLLM's default max_lora_rank (16) would refuse it
            update["engine_args"] = {**before.engine_args, "max_lora_rank": rank}
        self.catalog[base] = before.model_copy(update=update)
        try:
            evicted = await self._load_base(base)
        except errors.CyllmError as exc:  # serve the base as it was; the adapter is refused
            log.warning("model %s did not start with LoRA slots: %s", base, exc.message)
            self.catalog[base] = before
            self._no_slots.add(base)  # not tried again in this worker's life
            await self._load_base(base)
            raise errors.NotLoadable(
                f"model {base!r} could not start with LoRA slots: {exc.message}"
            ) from exc
        for name, path in adapters.items():
            await self._add_adapter(base, name, path)
        return evicted

    def register(
        self, model: str, from_model: str, model_path: Path | None, peft_adapter: Path | None
    ) -> None:
        """Add ``model`` to the catalog: ``from_model``'s spec with new weights (a full
        fine-tune) or with a PEFT adapter applied, served by an engine that loads them
        (``factory.engine_for_new_weights``)."""
        base = self.catalog.get(from_model)
        if base is None:
            raise errors.ModelNotFound(
                f"model {from_model!r} is not in this worker's catalog", param="from_model"
            )
        if ":" in model or not model:
            raise errors.InvalidRequest(f"bad model id {model!r} for a new catalog model", param="model")
        if (model_path is None) == (peft_adapter is None):
            raise errors.InvalidRequest("give exactly one of model_path or peft_adapter_path")
        update: dict = {"id": model, "adapters": {}, "preload": True}
        if model_path is not None:
            update.update(path=model_path, gguf=None)
        else:
            update["peft_adapter"] = peft_adapter
        engine = engine_for_new_weights(base, self.settings.cpu_engine, peft=peft_adapter is not None)
        if engine != base.engine:
            update.update(engine=engine, candidates=[], engine_args={})
        self.catalog[model] = base.model_copy(update=update)

    async def _load_base(self, model: str) -> list[str]:
        spec = self.catalog.get(model)
        if spec is None:
            raise errors.ModelNotFound(
                f"model {model!r} is not in this worker's catalog; it has: "
                f"{', '.join(sorted(self.catalog)) or 'nothing'}",
                param="model",
            )
        try:
            need = await compute_thread.once(self.estimate, spec)  # may convert the model
        except FileNotFoundError as exc:
            raise errors.NotLoadable(f"model {model!r}: {exc}") from exc
        evicted = await self._make_room(model, need)
        log.info(
            "loading model %s: needs %s, %s free",
            model,
            need.describe(),
            memory.gib(self.budget.free_bytes()),
        )
        if spec.lora_slots is None:
            spec = spec.model_copy(update={"lora_slots": self.lora_slots})
        try:
            engine = await compute_thread.once(
                create_engine, spec, self.settings.cache_dir, self.settings.cpu_engine
            )
        except FileNotFoundError as exc:
            raise errors.NotLoadable(f"model {model!r}: {exc}") from exc
        cores.spread()  # an engine chooses its cores from what this process may use
        try:
            card = await engine.load()
        except BaseException:
            await _quiet_close(engine)
            raise
        finally:
            cores.keep_off_engines()
        self.loaded[model] = Loaded(spec, engine, card, need, adapters=dict(spec.adapters))
        self.budget.used[model] = need
        log.info("model %s ready on %s (%s)", model, card.device, card.engine)
        return evicted

    async def _make_room(self, model: str, need: memory.Estimate) -> list[str]:
        evicted: list[str] = []
        while need.total > self.budget.free_bytes():
            idle = sorted(
                (
                    m
                    for mid, m in self.loaded.items()
                    if not (h := m.engine.health()).running and not h.waiting
                ),
                key=lambda m: m.last_used,
            )
            if not idle:
                raise errors.InsufficientMemory(
                    f"model {model!r} needs {need.describe()}, but only "
                    f"{memory.gib(self.budget.free_bytes())} of the worker's "
                    f"{memory.gib(self.budget.limit)} is free"
                    + (f" and the loaded models ({', '.join(self.loaded)}) are busy" if self.loaded else "")
                    + "; unload a model, or lower max_batch_size / max_context"
                )
            victim = idle[0].spec.id
            log.info("unloading %s (least recently used) to make room for %s", victim, model)
            await self._unload_base(victim, drain_s=0)
            evicted.append(victim)
        return evicted

    async def _add_adapter(self, base: str, adapter: str, path: Path | None) -> None:
        entry = self.loaded[base]
        if adapter in entry.adapters and path is None:
            return
        path = path or self.catalog[base].adapters.get(adapter)
        if path is None:
            raise errors.ModelNotFound(
                f"adapter {adapter!r} of {base!r} is unknown: give adapter_path to register it", param="model"
            )
        if adapter in entry.engine.adapters():
            await entry.engine.remove_adapter(adapter)  # a new version under the same name
        await entry.engine.add_adapter(adapter, Path(path))
        entry.adapters[adapter] = Path(path)

    # -- unloading --------------------------------------------------------------------

    async def unload(self, model: str) -> None:
        base, adapter = split_id(model)
        async with self._lock:
            entry = self.loaded.get(base)
            if entry is None or (adapter is not None and adapter not in entry.adapters):
                raise errors.ModelNotFound(f"model {model!r} is not loaded on this worker", param="model")
            if adapter is not None:
                await entry.engine.remove_adapter(adapter)
                del entry.adapters[adapter]
                entry.adapter_used.pop(adapter, None)
            else:
                await self._unload_base(base, drain_s=self.settings.drain_timeout_s)
        self.on_change()

    async def _unload_base(self, model: str, drain_s: float) -> None:
        entry = self.loaded.pop(model)  # no new requests from here on
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and entry.engine.health().running:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self.budget.used.pop(model, None)
        await entry.engine.close()
        cores.keep_off_engines()  # the cores it computed on are free again
        log.info("model %s unloaded", model)

    async def close(self) -> None:
        for entry in list(self.loaded.values()):
            await _quiet_close(entry.engine)
        self.loaded.clear()

    # -- what the worker advertises ---------------------------------------------------

    def served(self) -> list[pb.ModelInfo]:
        out = []
        for mid, m in self.loaded.items():
            out.append(card_to_proto(m.card, model_id=mid, memory_bytes=m.estimate.total))
            out += [card_to_proto(m.card, model_id=f"{mid}:{name}", base=mid) for name in m.adapters]
        return out

    def available(self) -> list[pb.ModelInfo]:
        return [
            pb.ModelInfo(id=mid, engine=spec.engine, state="available")
            for mid, spec in self.catalog.items()
            if mid not in self.loaded
        ]


async def _quiet_close(engine: AbstractEngine) -> None:
    try:
        await engine.close()
    except Exception as exc:
        log.warning("closing engine: %s", exc)


def _artefact_folder(root: Path, path: Path) -> Path | None:
    """The artefact's folder if it is this worker's to delete: a folder in a job's folder
    under ``root`` (never a job's folder, or the root), that exists."""
    try:
        folder = inside(root, path, "the artefact")
    except errors.InvalidRequest:
        return None  # not ours (another worker's, or storage elsewhere)
    if len(folder.relative_to(root.resolve()).parts) < 2 or not folder.exists():
        return None
    return folder


def _lora_rank(adapter: Path | None) -> int | None:
    """The smallest of vLLM's ``max_lora_rank`` values that holds the adapter's rank (16
    when its config does not say); None for a rank no slot holds."""
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text()) if adapter else {}
    except (OSError, ValueError):
        config = {}
    r = config.get("r", 16) if isinstance(config, dict) else 16
    r = r if isinstance(r, int) and r > 0 else 16
    return next((v for v in VLLM_LORA_RANKS if v >= r), None)
