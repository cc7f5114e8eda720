"""Whose request a call of the internal plane carries: the gateway authenticates the
end user and passes the result along in the call's metadata; the coordinator trusts
it because the plane itself is authenticated (``plane.py``).

The coordinator uses it to keep tenants apart: files, training jobs and fine-tuned
models belong to the tenant that made them, and another tenant's look exactly like
missing ones.  A call without tenant metadata comes from the plane's own callers (an
operator's tool holding the internal credentials) and is treated as an admin.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

import grpc

TENANT_KEY = "x-cyllm-tenant"
ADMIN_KEY = "x-cyllm-admin"
PUBLIC = ""  # the owner of what every tenant may see (base models, published models)


@dataclass(frozen=True)
class Tenant:
    subject: str
    admin: bool = False

    def metadata(self) -> tuple[tuple[str, str], ...]:
        # gRPC metadata is ASCII: a JWT subject may not be.
        return ((TENANT_KEY, quote(self.subject, safe="")), (ADMIN_KEY, "1" if self.admin else "0"))

    @classmethod
    def of(cls, context: grpc.aio.ServicerContext) -> Tenant:
        meta = dict(context.invocation_metadata() or ())
        if TENANT_KEY not in meta:
            return OPERATOR
        return cls(unquote(meta[TENANT_KEY]), meta.get(ADMIN_KEY) == "1")

    def owns(self, owner: str) -> bool:
        return self.admin or owner == self.subject

    def sees(self, owner: str) -> bool:
        return owner == PUBLIC or self.owns(owner)


OPERATOR = Tenant("operator", admin=True)
