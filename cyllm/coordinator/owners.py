"""Who owns which model: the one answer the scheduler (may this tenant's request use
the model?) and the services (which models does a tenant see, may it train on one?)
both read.

A model with no owner is public: every configured or pulled model.  A fine-tuned model
is owned by the tenant whose job made it, recorded before it is loaded, so no worker
serves a model whose owner is not known yet.  ``MemoryModelOwners`` keeps this in the
process; ``RedisModelOwners`` in the hash ``cyllm:model_owners``, which the Redis
scheduler also reads in the same script as the worker pool (``redis_backend``).
"""

from __future__ import annotations

import abc

import redis.asyncio as aioredis

from cyllm.shared_state import text

OWNERS_KEY = "cyllm:model_owners"


class ModelOwners(abc.ABC):
    @abc.abstractmethod
    async def set(self, model: str, owner: str) -> None:
        """Record ``owner`` as the owner of ``model``."""

    @abc.abstractmethod
    async def all(self) -> dict[str, str]:
        """model -> owner, for every model that has one."""


class MemoryModelOwners(ModelOwners):
    def __init__(self) -> None:
        self._owners: dict[str, str] = {}

    async def set(self, model: str, owner: str) -> None:
        self._owners[model] = owner

    async def all(self) -> dict[str, str]:
        return dict(self._owners)


class RedisModelOwners(ModelOwners):
    key = OWNERS_KEY

    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client

    async def set(self, model: str, owner: str) -> None:
        await self.r.hset(self.key, model, owner)

    async def all(self) -> dict[str, str]:
        rows = await self.r.hgetall(self.key)
        return {text(k): text(v) for k, v in rows.items()}
