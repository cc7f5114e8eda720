"""Who is calling: API keys (``keys.py``) and JWT bearer tokens (PyJWT).

``Authorization: Bearer <token>`` carries either; a token that starts with ``cy_`` is
an API key, anything else is verified as a JWT (HS256 with ``jwt_secret``, RS256 with
``jwt_public_key_file`` or a JWKS file; ``exp`` required, ``nbf``, ``iss`` and ``aud``
checked).  The JWT's ``sub`` and ``scope``/``scopes`` become the identity; the
``admin_scope`` scope (an admin API key has it) opens the admin routes.

Claims are type-checked (a list where a string belongs is a 401, never a 500), and
the two kinds of subject live apart (``key:<id>`` and ``jwt:<sub>``): a JWT whose
``sub`` reads like an API key's gets its own limits and its own files, not the key's.

:class:`AuthMiddleware` authenticates every HTTP request from its headers before the
route reads a byte of the body, so an unauthenticated 100 MB upload is refused at once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

import jwt
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from cyllm import errors
from cyllm.gateway.budgets import Budget
from cyllm.gateway.context import BATCH_CALLER, context, peek
from cyllm.gateway.errors import error_response
from cyllm.gateway.keys import PREFIX, KeyStore
from cyllm.gateway.settings import GatewaySettings
from cyllm.protocol.tenant import Tenant


@dataclass(frozen=True)
class Identity:
    subject: str
    kind: str  # "api_key" | "jwt" | "anonymous"
    scopes: frozenset[str] = frozenset()
    models: frozenset[str] | None = None  # None: every model
    admin_scope: str = "admin"
    budget: Budget | None = field(default=None, compare=False)  # budgets.py

    @property
    def admin(self) -> bool:
        return self.admin_scope in self.scopes

    def check_model(self, model: str, param: str = "model") -> None:
        self.tenant.check_model(model, param)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    @property
    def tenant(self) -> Tenant:
        return Tenant(self.subject, self.admin, self.models)


def anonymous(settings: GatewaySettings) -> Identity:
    """The caller when auth is off: the machine's own user (admin) on loopback; on any
    other address a plain caller, so an open gateway never hands out the admin routes."""
    scopes = frozenset({settings.admin_scope}) if loopback(settings.host) else frozenset()
    return Identity(
        "anonymous", "anonymous", scopes, None, settings.admin_scope, settings.budgets.get("anonymous")
    )


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _strings(claims: dict[str, Any], name: str) -> list[str] | None:
    """A claim that must be a list of strings (or absent)."""
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise errors.Unauthenticated(f"JWT claim {name!r} must be a list of strings")
    return value


class JwtVerifier:
    def __init__(self, settings: GatewaySettings) -> None:
        self.issuer, self.audience = settings.jwt_issuer, settings.jwt_audience
        self.keys: dict[str, object] = {}
        if settings.jwt_secret is not None:
            self.keys["HS256"] = settings.jwt_secret.get_secret_value()
        if settings.jwt_public_key_file is not None:
            self.keys["RS256"] = settings.jwt_public_key_file.read_text()
        self.jwks = None
        if settings.jwt_jwks_file is not None:
            self.jwks = jwt.PyJWKSet.from_dict(json.loads(settings.jwt_jwks_file.read_text()))

    @property
    def enabled(self) -> bool:
        return bool(self.keys or self.jwks)

    def verify(self, token: str, admin_scope: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
            alg, kid = header.get("alg"), header.get("kid")
            if not isinstance(alg, str) or not isinstance(kid, (str, type(None))):
                raise errors.Unauthenticated("JWT header: 'alg' and 'kid' must be strings")
            if alg == "RS256" and self.jwks is not None and kid:
                key = self.jwks[kid].key
            elif alg in self.keys:
                key = self.keys[alg]
            else:
                raise errors.Unauthenticated(f"JWT algorithm {alg!r} is not accepted here")
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except KeyError:
            raise errors.Unauthenticated("JWT signed with an unknown key id") from None
        except jwt.ExpiredSignatureError:
            raise errors.Unauthenticated("JWT has expired") from None
        except jwt.ImmatureSignatureError:
            raise errors.Unauthenticated("JWT is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise errors.Unauthenticated("JWT audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise errors.Unauthenticated("JWT issuer is not accepted") from None
        except jwt.PyJWTError as exc:
            raise errors.Unauthenticated(f"invalid JWT: {exc}") from None
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise errors.Unauthenticated("JWT claim 'sub' must be a non-empty string")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise errors.Unauthenticated("JWT claim 'scope' must be a space-separated string")
        scopes = _strings(claims, "scopes") or scope.split()
        models = _strings(claims, "models")
        return Identity(
            f"jwt:{claims['sub']}",
            "jwt",
            frozenset(scopes),
            frozenset(models) if models is not None else None,
            admin_scope,
        )


class Authenticator:
    def __init__(self, settings: GatewaySettings, keys: KeyStore) -> None:
        self.settings = settings
        self.keys = keys
        self.jwt = JwtVerifier(settings)

    async def identify(self, authorization: str | None) -> Identity:
        if not self.settings.auth_enabled:
            return anonymous(self.settings)
        if not authorization or not authorization.lower().startswith("bearer "):
            raise errors.Unauthenticated("missing credentials: send 'Authorization: Bearer <API key or JWT>'")
        token = authorization[7:].strip()
        if token.startswith(PREFIX):
            key = await self.keys.verify(token)
            if key is None:
                raise errors.Unauthenticated("invalid, revoked or expired API key")
            scopes = frozenset({self.settings.admin_scope} if key.admin else ())
            subject = f"key:{key.key_id}"
            return Identity(
                subject,
                "api_key",
                scopes,
                frozenset(key.models) if key.models is not None else None,
                self.settings.admin_scope,
                Budget(**key.budget) if key.budget else self.settings.budgets.get(subject),
            )
        if not self.jwt.enabled:
            raise errors.Unauthenticated("not an API key, and JWTs are not configured")
        identity = self.jwt.verify(token, self.settings.admin_scope)
        budget = self.settings.budgets.get(identity.subject)
        return identity if budget is None else dataclasses.replace(identity, budget=budget)

    async def batch_caller(self, identity: Identity) -> Identity:
        """The creator of a batch, for one of its requests: an API key must still be live,
        and its budget as it is now applies."""
        budget = self.settings.budgets.get(identity.subject)
        if identity.kind == "api_key":
            key_id = identity.subject.removeprefix("key:")
            if not await self.keys.live(key_id):
                raise errors.Unauthenticated("the API key that created this batch was revoked or has expired")
            key = await self.keys.find(key_id)
            if key is not None and key.budget:
                budget = Budget(**key.budget)
        return dataclasses.replace(identity, budget=budget)


async def authenticate(request: Request) -> Identity:
    """FastAPI dependency: the caller's identity (also in the request's context), or 401.
    :class:`AuthMiddleware` has normally found it already, before the body was read."""
    ctx = context(request)
    if ctx.identity is None:
        ctx.identity = await request.app.state.auth.identify(request.headers.get("authorization"))
    return ctx.identity


class AuthMiddleware:
    """Credentials first: every HTTP request but the public ones (health, API docs, the
    console's static page and, when ``metrics_public``, metrics) is authenticated from its headers before the
    route runs, so nothing of a body is read for a caller who may not send it.
    WebSockets authenticate in their route (their errors are frames, not responses)."""

    PUBLIC = ("/api/v1/health", "/docs", "/redoc", "/openapi.json", "/console")
    METRICS = ("/metrics", "/actuator/prometheus")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._public(scope):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        header = dict(scope["headers"]).get(b"authorization")
        batch_caller = scope.get(BATCH_CALLER)
        try:
            if batch_caller is not None:
                identity = await state.auth.batch_caller(batch_caller)
            else:
                identity = await state.auth.identify(header.decode("latin-1") if header else None)
        except errors.CyllmError as exc:
            return await error_response(exc)(scope, receive, send)
        ctx = peek(scope)
        if ctx is not None:
            ctx.identity = identity
        await self.app(scope, receive, send)

    def _public(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in self.METRICS:
            return scope["app"].state.settings.metrics_public
        return any(path == p or path.startswith(p + "/") for p in self.PUBLIC)


async def require_admin(request: Request) -> Identity:
    identity = await authenticate(request)
    if not identity.admin:
        raise errors.Forbidden(f"this route needs the {request.app.state.settings.admin_scope!r} scope")
    return identity
