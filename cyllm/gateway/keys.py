"""API keys: created, listed and revoked by an admin; stored hashed, never in clear.

A key reads ``cy_<key id>_<secret>``.  The store keeps, per key id, the SHA-256 of the
secret (keys are 256 random bits, so a fast hash is enough; no salt is needed against
guessing) and compares in constant time.  ``FileKeyStore`` (a JSON file, mode 0600,
re-read when it changes so a revocation takes effect at once) serves one gateway and the
``cyllm keys`` command beside it; ``RedisKeyStore`` serves several gateways from one
Redis.

A store that cannot be read refuses every credential with a 503 naming it (fails
closed): a broken store must not become an open door, nor a 500 per request.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis.asyncio as aioredis

from cyllm import errors

PREFIX = "cy_"
log = logging.getLogger(__name__)
UNREADABLE = (
    "the API key store cannot be read, so every credential is refused until an operator "
    "repairs it (the gateway's log names the file)"
)


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
    budget: dict | None = None  # budgets.Budget's fields; None: the gateway's budgets setting

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
        budget: dict | None = None,
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
            budget=budget,
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

    async def set_budget(self, key_id: str, budget: dict | None) -> ApiKey | None:
        key = await self._load(key_id)
        if key is None:
            return None
        key.budget = budget
        await self._save(key)
        return key

    async def find(self, key_id: str) -> ApiKey | None:
        return await self._load(key_id)

    async def live(self, key_id: str) -> bool:
        """Whether the key exists and is neither revoked nor expired."""
        key = await self._load(key_id)
        return (
            key is not None and not key.revoked and (key.expires_at is None or key.expires_at > time.time())
        )

    async def verify(self, presented: str) -> ApiKey | None:
        """The key if ``presented`` is a live key, else None (unknown, wrong, revoked, expired)."""
        parts = split(presented)
        if parts is None:
            return None
        key = await self._load(parts[0])
        if key is None or not hmac.compare_digest(key.secret_sha256, _digest(parts[1])):
            return None
        return key if await self.live(key.key_id) else None


class FileKeyStore(KeyStore):
    """Keys in a JSON file.  Writers in any process (gateways, ``cyllm keys``) take an
    exclusive ``flock`` on ``<file>.lock``, read the file afresh, change one key and
    replace the file by a complete new one (a temporary file of their own, flushed,
    then renamed): a reader sees the old file or the new one, never a part, and no
    writer's change is lost to another's."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self._stamp: tuple[int, int, int] | None = None
        self._keys: dict[str, ApiKey] = {}

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self._keys = self._read()
            self._stamp = stamp

    def _read(self) -> dict[str, ApiKey]:
        try:
            raw = json.loads(self.path.read_text() or "{}")
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            return {k: ApiKey(**v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError) as exc:
            log.error("API key store %s cannot be read: %s", self.path, exc)
            raise errors.Unavailable(UNREADABLE) from None

    async def _load(self, key_id: str) -> ApiKey | None:
        self._refresh()
        return self._keys.get(key_id)

    async def all(self) -> list[ApiKey]:
        self._refresh()
        return sorted(self._keys.values(), key=lambda k: k.created)

    async def _save(self, key: ApiKey) -> None:
        await asyncio.to_thread(self._write, key)  # waits for other writers' locks
        self._stamp = None

    def _write(self, key: ApiKey) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            keys = self._read()
            keys[key.key_id] = key
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:  # mkstemp made it 0600
                    json.dump({k: asdict(v) for k, v in keys.items()}, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)  # the rename itself survives a crash
            finally:
                os.close(directory)


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
