"""Who may see which model: the one answer the scheduler (may this tenant's request use
the model?) and the services (which models does a tenant see, may it train on one?)
both read.

A model absent from the map is public: every configured model.  A model made here (a
fine-tune's result) is a record of the registry (``registry.py``), which is this
interface's implementation: its owner, and whom it is published to.  The map's value
is what ``Tenant.sees`` reads: ``""`` (everyone), or the tenants who may, a JSON list.
In Redis the map is the hash ``cyllm:model_owners``, which the Redis scheduler reads in
the same script as the worker pool (``redis_backend``).
"""

from __future__ import annotations

import abc

OWNERS_KEY = "cyllm:model_owners"


class ModelOwners(abc.ABC):
    @abc.abstractmethod
    async def all(self) -> dict[str, str]:
        """model -> who may see it, for every model that is not public."""
