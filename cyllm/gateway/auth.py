"""Who is calling: API keys (``keys.py``) and JWT bearer tokens (PyJWT).

``Authorization: Bearer <token>`` carries either; a token that starts with ``cy_`` is
an API key, anything else is verified as a JWT (HS256 with ``jwt_secret``, RS256 with
``jwt_public_key_file`` or a JWKS file; ``exp`` required, ``nbf``, ``iss`` and ``aud``
checked).  The JWT's ``sub`` and ``scope``/``scopes`` become the identity; the
``admin_scope`` scope (an admin API key has it) opens the admin routes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jwt
from fastapi import Request

from cyllm import errors
from cyllm.gateway.context import context
from cyllm.gateway.keys import PREFIX, KeyStore
from cyllm.gateway.settings import GatewaySettings


@dataclass(frozen=True)
class Identity:
    subject: str
    kind: str  # "api_key" | "jwt" | "anonymous"
    scopes: frozenset[str] = frozenset()
    models: frozenset[str] | None = None  # None: every model
    admin_scope: str = "admin"

    @property
    def admin(self) -> bool:
        return self.admin_scope in self.scopes

    def check_model(self, model: str) -> None:
        if self.models is not None and model not in self.models:
            raise errors.Forbidden(f"this key may not use model {model!r}", param="model")


ANONYMOUS = Identity("anonymous", "anonymous", frozenset({"admin"}))


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
            alg = header.get("alg")
            if alg == "RS256" and self.jwks is not None and header.get("kid"):
                key = self.jwks[header["kid"]].key
            elif alg in self.keys:
                key = self.keys[alg]
            else:
                raise errors.Unauthenticated(f"JWT algorithm {alg!r} is not accepted here")
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
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
        scopes = claims.get("scopes") or str(claims.get("scope", "")).split()
        models = claims.get("models")
        return Identity(str(claims["sub"]), "jwt", frozenset(scopes),
                        frozenset(models) if models is not None else None, admin_scope)


class Authenticator:
    def __init__(self, settings: GatewaySettings, keys: KeyStore) -> None:
        self.settings = settings
        self.keys = keys
        self.jwt = JwtVerifier(settings)

    async def identify(self, authorization: str | None) -> Identity:
        if not self.settings.auth_enabled:
            return ANONYMOUS
        if not authorization or not authorization.lower().startswith("bearer "):
            raise errors.Unauthenticated(
                "missing credentials: send 'Authorization: Bearer <API key or JWT>'")
        token = authorization[7:].strip()
        if token.startswith(PREFIX):
            key = await self.keys.verify(token)
            if key is None:
                raise errors.Unauthenticated("invalid, revoked or expired API key")
            scopes = frozenset({self.settings.admin_scope} if key.admin else ())
            return Identity(f"key:{key.key_id}", "api_key", scopes,
                            frozenset(key.models) if key.models is not None else None,
                            self.settings.admin_scope)
        if not self.jwt.enabled:
            raise errors.Unauthenticated("not an API key, and JWTs are not configured")
        return self.jwt.verify(token, self.settings.admin_scope)


async def authenticate(request: Request) -> Identity:
    """FastAPI dependency: the caller's identity (also in the request's context), or 401."""
    identity = await request.app.state.auth.identify(request.headers.get("authorization"))
    context(request).identity = identity
    return identity


async def require_admin(request: Request) -> Identity:
    identity = await authenticate(request)
    if not identity.admin:
        raise errors.Forbidden(f"this route needs the {request.app.state.settings.admin_scope!r} scope")
    return identity
