"""API keys: created, listed and revoked by an admin; stored hashed, never in clear.

A key reads ``cy_<key id>_<secret>``.  The store keeps, per key id, the SHA-256 of the
secret (keys are 256 random bits, so a fast hash is enough; no salt is needed against
guessing) and compares in constant time.  ``FileKeyStore`` (a JSON file, mode 0600,
re-read when it changes so a revocation takes effect at once) serves one gateway;
``RedisKeyStore`` serves several gateways from one Redis.
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis.asyncio as aioredis

PREFIX = "cy_"


@dataclass
class ApiKey:
    key_id: str
    name: str
    secret_sha256: str
    created: float
    expires_at: float | None = None
    models: list[str] | None = None  # None: every model
    admin: bool = False
    revoked: bool = False

    def public(self) -> dict:
        """What listing shows: everything but the hash."""
        out = asdict(self)
        del out["secret_sha256"]
        return out


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split(presented: str) -> tuple[str, str] | None:
    if not presented.startswith(PREFIX):
        return None
    key_id, _, secret = presented[len(PREFIX) :].partition("_")
    return (key_id, secret) if key_id and secret else None


class KeyStore(abc.ABC):
    @abc.abstractmethod
    async def _load(self, key_id: str) -> ApiKey | None: ...

    @abc.abstractmethod
    async def _save(self, key: ApiKey) -> None: ...

    @abc.abstractmethod
    async def all(self) -> list[ApiKey]: ...

    async def create(
        self,
        name: str,
        *,
        admin: bool = False,
        models: list[str] | None = None,
        expires_in_s: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its only appearance in clear."""
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = ApiKey(
            key_id,
            name,
            _digest(secret),
            time.time(),
            time.time() + expires_in_s if expires_in_s else None,
            models,
            admin,
        )
        await self._save(key)
        return key, f"{PREFIX}{key_id}_{secret}"

    async def revoke(self, key_id: str) -> bool:
        key = await self._load(key_id)
        if key is None:
            return False
        key.revoked = True
        await self._save(key)
        return True

    async def verify(self, presented: str) -> ApiKey | None:
        """The key if ``presented`` is a live key, else None (unknown, wrong, revoked, expired)."""
        parts = split(presented)
        if parts is None:
            return None
        key = await self._load(parts[0])
        if key is None or not hmac.compare_digest(key.secret_sha256, _digest(parts[1])):
            return None
        if key.revoked or (key.expires_at is not None and key.expires_at <= time.time()):
            return None
        return key


class FileKeyStore(KeyStore):
    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self._stamp: tuple[float, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp != self._stamp:
            raw = json.loads(self.path.read_text() or "{}")
            self._keys = {k: ApiKey(**v) for k, v in raw.items()}
            self._stamp = stamp

    async def _load(self, key_id: str) -> ApiKey | None:
        self._refresh()
        return self._keys.get(key_id)

    async def all(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda k: k.created)

    async def _save(self, key: ApiKey) -> None:
        self._refresh()
        self._keys[key.key_id] = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({k: asdict(v) for k, v in self._keys.items()}, f, indent=1)
        tmp.replace(self.path)
        self._stamp = None


class RedisKeyStore(KeyStore):
    KEY = "cyllm:apikeys"

    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client

    async def _load(self, key_id: str) -> ApiKey | None:
        raw = await self.r.hget(self.KEY, key_id)
        return ApiKey(**json.loads(raw)) if raw else None

    async def all(self) -> list[ApiKey]:
        rows = await self.r.hgetall(self.KEY)
        return sorted((ApiKey(**json.loads(v)) for v in rows.values()), key=lambda k: k.created)

    async def _save(self, key: ApiKey) -> None:
        await self.r.hset(self.KEY, key.key_id, json.dumps(asdict(key)))
