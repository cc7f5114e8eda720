"""Whose request a call of the internal plane carries: the gateway authenticates the
end user and passes the result along in the call's metadata; the coordinator trusts
it because the plane itself is authenticated (``plane.py``).

The coordinator uses it to keep tenants apart: files, training jobs and fine-tuned
models belong to the tenant that made them, and another tenant's look exactly like
missing ones.  A call without tenant metadata comes from the plane's own callers (an
operator's tool holding the internal credentials) and is treated as an admin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote, unquote

import grpc

from cyllm import errors

TENANT_KEY = "x-cyllm-tenant"
ADMIN_KEY = "x-cyllm-admin"
MODELS_KEY = "x-cyllm-models"  # the caller's allow-list, when its key has one
PUBLIC = ""  # the owner of what every tenant may see (base models, published models)


@dataclass(frozen=True)
class Tenant:
    """``models``: the models the caller's key may use (None: any); the gateway checks
    them and the coordinator checks them again, on every call that names a model."""

    subject: str
    admin: bool = False
    models: frozenset[str] | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        # gRPC metadata is ASCII: a JWT subject may not be.
        meta: tuple[tuple[str, str], ...] = (
            (TENANT_KEY, quote(self.subject, safe="")),
            (ADMIN_KEY, "1" if self.admin else "0"),
        )
        if self.models is not None:
            meta += ((MODELS_KEY, quote(json.dumps(sorted(self.models)), safe="")),)
        return meta

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext) -> Tenant:
        meta = dict(context.invocation_metadata() or ())
        if TENANT_KEY not in meta:
            return OPERATOR
        models = None
        if MODELS_KEY in meta:
            models = frozenset(str(m) for m in json.loads(unquote(meta[MODELS_KEY])))
        return cls(unquote(meta[TENANT_KEY]), meta.get(ADMIN_KEY) == "1", models)

    def check_model(self, model: str, param: str = "model") -> None:
        """Forbidden when the caller's key may not use ``model``."""
        if self.models is not None and model not in self.models:
            raise errors.Forbidden(f"this key may not use model {model!r}", param=param)

    def owns(self, owner: str) -> bool:
        return self.admin or owner == self.subject

    def sees(self, visibility: str) -> bool:
        """``visibility``: who may see a model (``coordinator/owners.py``): ``PUBLIC``, or
        the tenants who may, as a JSON list (the first its owner)."""
        return visibility == PUBLIC or self.admin or self.subject in json.loads(visibility)


OPERATOR = Tenant("operator", admin=True)
