"""What a tenant does with the models it made: delete, publish, export, and alias them.

- **delete**: its owner (or an admin) deletes a model made here: its record goes first
  (no request loads it again), then every worker serving it unloads it (running
  requests finish, bounded by the worker's drain) and the worker holding its artefact
  deletes it.  Another tenant's model reads as missing (404); a configured model is not
  deleted here (an admin unloads it).
- **publish** (admins): to named tenants, or to everyone; withdrawn the same way.
- **export**: the artefact folder (a PEFT adapter or a Hugging Face model folder) as a
  tar stream, read from storage the coordinator shares with the workers (as uploads).
- **aliases**: a tenant's stable names for models it may use; moved atomically with a
  recorded history, rolled back to where they pointed before their last move.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import tarfile
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from cyllm import errors
from cyllm.coordinator.loading import ModelAdmin
from cyllm.coordinator.registry import EVERYONE, AliasMove, ModelRecord, Registry
from cyllm.coordinator.scheduler import Scheduler
from cyllm.coordinator.workers import WorkerClients
from cyllm.paths import ALIAS_PATTERN, ALIAS_RULE
from cyllm.protocol import pb
from cyllm.protocol.tenant import PUBLIC, Tenant

log = logging.getLogger(__name__)
ALIAS = re.compile(ALIAS_PATTERN)
CHUNK = 1 << 20
ARTEFACT_MARKS = ("adapter_config.json", "config.json")  # what a PEFT or model folder holds


class Lifecycle:
    def __init__(
        self,
        scheduler: Scheduler,
        registry: Registry,
        admin: ModelAdmin,
        workers: WorkerClients,
        private: Sequence[Path] = (),
    ) -> None:
        self.scheduler = scheduler
        self.registry = registry
        self.admin = admin
        self.workers = workers
        self.private = [p.resolve() for p in private]

    async def owned(self, model: str, tenant: Tenant) -> ModelRecord:
        """The record of ``model`` if ``tenant`` owns it (or is an admin); another
        tenant's reads as missing, one published to the caller is refused by name."""
        tenant.check_model(model)  # the key's allow-list
        record = await self.registry.get(model)
        if record is None or not tenant.sees(record.visibility):
            if record is None and any(m.id == model for m in await self.scheduler.models()):
                raise errors.InvalidRequest(
                    f"model {model!r} is configured on the workers, not made here: an admin unloads "
                    "it (POST /api/v1/models/{id}/unload)",
                    param="model",
                )
            raise errors.ModelNotFound(f"model {model!r} does not exist", param="model")
        if not tenant.owns(record.owner):
            raise errors.Forbidden(
                f"only the owner of model {model!r} (or an admin) may do that", param="model"
            )
        return record

    async def delete(self, model: str, tenant: Tenant) -> list[str]:
        """Delete a model made here; the workers it was unloaded from.  The record becomes
        a tombstone first: no request loads it again, and a copy a worker still holds
        (unreachable now) is for admins only, never another tenant's."""
        record = await self.owned(model, tenant)
        await self.registry.delete(model)
        unloaded: list[str] = []
        try:
            unloaded = list((await self.admin.unload(pb.UnloadModelRequest(model=model))).worker_ids)
        except errors.ModelNotFound:
            pass  # loaded nowhere
        except errors.CyllmError as exc:  # an unreachable worker: its copy stays, hidden
            log.warning("model %s deleted, but not unloaded everywhere: %s", model, exc.message)
        forget = pb.ForgetRequest(model=model, path=record.path)
        for view in await self.scheduler.workers():
            if not view.healthy:
                continue
            try:
                reply = await self.workers.forget(view.record.info.address, forget)
            except errors.CyllmError as exc:  # its artefact stays; the record is gone
                log.warning("worker %s could not forget %s: %s", view.record.worker_id, model, exc.message)
                continue
            await self.scheduler.register(reply.worker)
        log.info("model %s deleted by %s", model, tenant.subject)
        return unloaded

    async def publish(self, request: pb.PublishModelRequest, tenant: Tenant) -> ModelRecord:
        if not tenant.admin:
            raise errors.Forbidden("publishing a model to other tenants needs the admin scope")
        record = await self.owned(request.model, tenant)
        if request.withdraw:
            record.published = []
        elif request.everyone:
            record.published = [EVERYONE]
        else:
            record.published = sorted(set(record.published) | set(request.tenants))
        await self.registry.put(record)
        return record

    async def export(self, model: str, tenant: Tenant) -> AsyncIterator[pb.FileChunk]:
        """The artefact as a tar stream (its folder's files, under the model's name)."""
        record = await self.owned(model, tenant)
        folder, marked = await asyncio.to_thread(_artefact, Path(record.path))
        if not await asyncio.to_thread(folder.is_dir):
            raise errors.Unavailable(
                f"model {model!r}'s artefact is not on storage this coordinator reads; export it "
                "where it lives (coordinator.files_dir's storage, shared with the workers)"
            )
        if any(folder == p or p in folder.parents or folder in p.parents for p in self.private) or not marked:
            # a path a worker (or a script) made up: only a model's or an adapter's folder
            raise errors.Forbidden(f"model {model!r}'s artefact is not a model folder this server exports")
        chunks: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=8)
        stop = threading.Event()
        thread = threading.Thread(target=_tar, args=(folder, _safe(model), chunks, stop), daemon=True)
        thread.start()
        first = True
        try:
            while True:
                item = await asyncio.to_thread(chunks.get)
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise errors.EngineError(f"exporting model {model!r} failed: {item}")
                yield pb.FileChunk(filename=f"{_safe(model)}.tar" if first else "", data=item)
                first = False
        finally:
            stop.set()
            while thread.is_alive():  # let it see the stop: make room for its last put
                try:
                    chunks.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.01)
            # a reader cancelled while waiting (the client went away) still holds a pool
            # thread in chunks.get(): give it something to return
            chunks.put_nowait(None)

    # -- aliases

    async def set_alias(self, request: pb.AliasRequest, tenant: Tenant) -> AliasMove:
        name = request.name
        if not ALIAS.match(name):
            raise errors.InvalidRequest(ALIAS_RULE, param="name")
        if request.rollback:
            moves = await self.registry.moves(tenant.subject, name)
            current = await self.registry.alias(tenant.subject, name)
            if not moves or current is None:
                raise errors.NotFound(f"alias {name!r} does not exist", param="name")
            before = moves[-1].from_model
            if not before:
                raise errors.InvalidRequest(
                    f"alias {name!r} has pointed nowhere else to roll back to", param="name"
                )
            await self._usable(before, tenant)  # still there, and still the tenant's to use
            return await self.registry.move(
                tenant.subject, name, before, tenant.subject, request.reason or "rollback", expect=current
            )
        if await self._is_model(name, tenant):
            raise errors.InvalidRequest(
                f"{name!r} is a model's id: an alias needs a name of its own", param="name"
            )
        await self._usable(request.model, tenant)
        return await self.registry.move(
            tenant.subject,
            name,
            request.model,
            tenant.subject,
            request.reason or "set",
            expect=request.expect or None,
        )

    async def _is_model(self, name: str, tenant: Tenant) -> bool:
        """A model's id the tenant may see (others' read as free names: no oracle)."""
        visibility = (await self.registry.all()).get(name)
        if visibility is not None:
            return tenant.sees(visibility)
        return any(m.id == name for m in await self.scheduler.models())

    async def _usable(self, model: str, tenant: Tenant) -> None:
        """ModelNotFound unless ``tenant`` may use ``model`` (an alias points only there)."""
        tenant.check_model(model)
        record = await self.registry.get(model)
        if record is not None:
            if tenant.sees(record.visibility):
                return
        elif any(m.id == model for m in await self.scheduler.models()):
            owners = await self.registry.all()
            if tenant.sees(owners.get(model, PUBLIC)):
                return
        raise errors.ModelNotFound(f"model {model!r} does not exist", param="model")

    async def alias(self, name: str, tenant: Tenant) -> tuple[str, list[AliasMove]]:
        target = await self.registry.alias(tenant.subject, name)
        if target is None:
            raise errors.NotFound(f"alias {name!r} does not exist", param="name")
        return target, await self.registry.moves(tenant.subject, name)

    async def drop_alias(self, name: str, tenant: Tenant) -> str:
        target = await self.registry.alias(tenant.subject, name)
        if target is None or not await self.registry.drop_alias(tenant.subject, name):
            raise errors.NotFound(f"alias {name!r} does not exist", param="name")
        return target


def _artefact(path: Path) -> tuple[Path, bool]:
    """The folder, resolved, and whether it holds what a PEFT or model folder holds."""
    folder = path.resolve()
    return folder, any((folder / name).is_file() for name in ARTEFACT_MARKS)


def _safe(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", model)


def _tar(
    folder: Path, name: str, out: queue.Queue[bytes | BaseException | None], stop: threading.Event
) -> None:
    """The folder's regular files (no links followed out of it) as a tar, in chunks."""

    class Sink:
        def write(self, data: bytes) -> int:
            for i in range(0, len(data), CHUNK):
                if stop.is_set():
                    raise InterruptedError
                out.put(bytes(data[i : i + CHUNK]))
            return len(data)

    try:
        with tarfile.open(fileobj=Sink(), mode="w|") as tar:  # type: ignore[call-overload]
            for path in sorted(folder.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    tar.add(path, arcname=f"{name}/{path.relative_to(folder)}", recursive=False)
        out.put(None)
    except InterruptedError:
        return
    except BaseException as exc:  # told to the reader, in order
        out.put(exc)
