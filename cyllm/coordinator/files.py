"""Uploaded files (``POST /v1/files``): written under ``coordinator.files_dir``, their
records in the job store, each owned by the tenant that uploaded it (another tenant's
file reads as a missing one).  A ``fine-tune`` file must read as a dataset, a ``batch``
file as a batch's requests (``batch_input.py``); ``batch_output`` files are written by
batches, never uploaded.  Workers read a job's dataset from that path, so with
several machines ``files_dir`` must be storage they all mount (as ``worker.training_dir``)."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from cyllm import errors
from cyllm.coordinator.batch_input import read_requests
from cyllm.coordinator.datasets import DatasetPolicy
from cyllm.coordinator.jobs import JobStore
from cyllm.paths import is_id
from cyllm.protocol import pb
from cyllm.protocol.tenant import Tenant

PURPOSES = ("fine-tune", "batch")  # what may be uploaded
CHUNK = 1 << 20


class FileStore:
    def __init__(
        self,
        store: JobStore,
        root: Path,
        max_bytes: int,
        datasets: DatasetPolicy | None = None,
        batch_max_requests: int = 50_000,
    ) -> None:
        self.store = store
        self.root = root
        self.max_bytes = max_bytes
        self.datasets = datasets or DatasetPolicy()
        self.batch_max_requests = batch_max_requests

    async def upload(self, chunks: AsyncIterator[pb.FileChunk], tenant: Tenant) -> pb.FileInfo:
        """Write the stream to disk; a fine-tune file must read as a dataset."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        folder = self.root / file_id
        info: pb.FileInfo | None = None
        out = None
        try:
            async for chunk in chunks:
                if info is None:
                    info = self._start(file_id, chunk, folder, tenant)
                    out = await asyncio.to_thread(open, Path(info.path), "wb")
                info.bytes += len(chunk.data)
                if info.bytes > self.max_bytes:
                    raise errors.InvalidRequest(
                        f"file is over the {self.max_bytes} byte limit (coordinator.files_max_bytes)",
                        param="file",
                    )
                assert out is not None  # opened with the first chunk
                await asyncio.to_thread(out.write, chunk.data)
            if info is None:
                raise errors.InvalidRequest("no file was sent", param="file")
            assert out is not None  # opened with the first chunk
            out.close()
            if info.bytes == 0:
                raise errors.InvalidRequest(f"{info.filename} is empty", param="file")
            if info.purpose == "batch":  # a clear 400 now, not a failed batch later
                await asyncio.to_thread(read_requests, Path(info.path), self.batch_max_requests)
            else:
                await self.datasets.check(info.path)
        except BaseException:
            if out is not None:
                out.close()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        await self.store.put_file(info)
        return info

    def _start(self, file_id: str, chunk: pb.FileChunk, folder: Path, tenant: Tenant) -> pb.FileInfo:
        if chunk.purpose not in PURPOSES:
            raise errors.InvalidRequest(
                f"purpose {chunk.purpose[:64]!r} is not supported; this "
                f"server takes files for: {', '.join(PURPOSES)}",
                param="purpose",
            )
        name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(chunk.filename or "data.jsonl").name)[-128:]
        name = name.lstrip(".") or "data.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        return pb.FileInfo(
            id=file_id,
            filename=(chunk.filename or name)[:256],
            purpose=chunk.purpose,
            created_at=int(time.time()),
            path=str(folder / name),
            owner=tenant.subject,
        )

    def new(self, filename: str) -> Path:
        """Where a file made here (a batch's output) is written, before ``register``."""
        folder = self.root / f"file-{uuid.uuid4().hex[:24]}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / filename
        path.touch()
        return path

    async def register(self, path: Path, owner: str, purpose: str) -> pb.FileInfo:
        info = pb.FileInfo(
            id=path.parent.name,
            filename=path.name,
            bytes=(await asyncio.to_thread(path.stat)).st_size,
            created_at=int(time.time()),
            purpose=purpose,
            path=str(path),
            owner=owner,
        )
        await self.store.put_file(info)
        return info

    async def read(self, file_id: str, tenant: Tenant, offset: int = 0) -> AsyncIterator[pb.FileChunk]:
        """The file's bytes from ``offset``, a chunk at a time (read on a thread)."""
        info = await self.get(file_id, tenant)
        if offset < 0:
            raise errors.InvalidRequest("offset must be 0 or more", param="offset")
        try:
            f = await asyncio.to_thread(open, info.path, "rb")
        except OSError:
            raise errors.NotFound(f"file {file_id!r} is no longer on disk", param="file_id") from None
        try:
            await asyncio.to_thread(f.seek, offset)
            while data := await asyncio.to_thread(f.read, CHUNK):
                yield pb.FileChunk(data=data)
        finally:
            f.close()

    async def get(self, file_id: str, tenant: Tenant, param: str = "file_id") -> pb.FileInfo:
        info = await self.store.get_file(file_id) if is_id(file_id) else None  # malformed: unknown
        if info is None or not tenant.owns(info.owner):
            raise errors.NotFound(f"file {file_id!r} does not exist", param=param)
        return info

    async def owned(self, tenant: Tenant, purpose: str = "") -> list[pb.FileInfo]:
        return [
            f
            for f in await self.store.files()
            if tenant.owns(f.owner) and (not purpose or f.purpose == purpose)
        ]

    async def delete(self, file_id: str, tenant: Tenant) -> None:
        info = await self.get(file_id, tenant)
        await self.store.delete_file(file_id)
        shutil.rmtree(Path(info.path).parent, ignore_errors=True)
