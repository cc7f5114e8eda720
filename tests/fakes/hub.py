"""A local stand-in for the Hugging Face Hub's file API, enough for ``huggingface_hub``'s
``snapshot_download`` and ``dataset_info`` (``HF_ENDPOINT`` pointed at it): a
repository's revision and file tree (with sizes), and its files by ``resolve`` URL with
the headers the client reads (commit, ETag, size).  It serves folders given as
``{"org/name": folder}`` (models) and ``{"datasets/org/name": folder}`` (datasets);
anything else is a 404, as the Hub answers for a repository that does not exist.  Requests are counted, to
show that a second start downloads nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse

from tests.fakes import ThreadedServer

SHA = "0123456789abcdef0123456789abcdef01234567"


def app(repos: dict[str, Path]) -> FastAPI:
    api = FastAPI()
    api.state.downloads = []

    def folder(org: str, name: str, kind: str = "models") -> Path:
        key = f"{org}/{name}" if kind == "models" else f"{kind}/{org}/{name}"
        if kind not in ("models", "datasets") or key not in repos:
            raise HTTPException(404, headers={"X-Error-Code": "RepoNotFound"})
        return repos[key]

    def files(root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file())

    @api.get("/api/{kind}/{org}/{name}")
    async def info(kind: str, org: str, name: str):
        return await revision(kind, org, name, "main")

    @api.get("/api/{kind}/{org}/{name}/revision/{revision}")
    async def revision(kind: str, org: str, name: str, revision: str):
        root = folder(org, name, kind)
        if revision not in ("main", SHA):
            raise HTTPException(404, headers={"X-Error-Code": "RevisionNotFound"})
        return {
            "id": f"{org}/{name}",
            "sha": SHA,
            "private": False,
            "siblings": [
                {"rfilename": str(p.relative_to(root)), "size": p.stat().st_size} for p in files(root)
            ],
        }

    @api.get("/api/{kind}/{org}/{name}/tree/{revision}")
    async def tree(kind: str, org: str, name: str, revision: str):
        root = folder(org, name, kind)
        return [
            {
                "type": "file",
                "path": str(p.relative_to(root)),
                "size": p.stat().st_size,
                "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
            }
            for p in files(root)
        ]

    @api.api_route("/datasets/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve_dataset(org: str, name: str, revision: str, path: str, request: Request):
        return send(folder(org, name, "datasets"), path, request)

    @api.api_route("/{org}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    async def resolve(org: str, name: str, revision: str, path: str, request: Request):
        return send(folder(org, name), path, request)

    def send(root: Path, path: str, request: Request):
        file = (root / path).resolve()
        if not file.is_relative_to(root.resolve()) or not file.is_file():
            raise HTTPException(404, headers={"X-Error-Code": "EntryNotFound"})
        etag = f'"{hashlib.sha256(file.read_bytes()).hexdigest()}"'
        headers = {"X-Repo-Commit": SHA, "ETag": etag}
        if request.method == "HEAD":
            return JSONResponse(None, headers={**headers, "Content-Length": str(file.stat().st_size)})
        api.state.downloads.append(path)
        return FileResponse(file, headers=headers)

    return api


class Hub(ThreadedServer):
    """``with Hub({"org/name": folder, "datasets/org/data": folder}, port) as hub: hub.url``"""

    def __init__(self, repos: dict[str, Path], port: int) -> None:
        super().__init__(app(repos), port)

    @property
    def downloads(self) -> list[str]:
        return self.app.state.downloads
