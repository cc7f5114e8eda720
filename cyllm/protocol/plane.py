"""Who may call the internal gRPC plane: one set of credentials for every server and
every client of it (coordinator, worker, gateway).

Two mechanisms, usable together:

* **a shared token** (``internal.token``/``token_file``): every call carries
  ``authorization: Bearer <token>``; servers compare it in constant time.  Anyone
  holding the token may call anything, so it suits one machine (``cyllm serve`` makes
  one per run) or a network where TLS is terminated by something else.
* **mutual TLS** (``internal.tls_ca_file``, ``tls_cert_file``, ``tls_key_file``; made by
  ``cyllm certs``): servers require a client certificate signed by the CA, and the
  certificate's common name is the caller's *role*.  Roles narrow what may be called:
  only a ``worker`` may call the coordinator's ``WorkerPool`` (register, heartbeat),
  only a ``coordinator`` may call a worker, only a ``gateway`` may call the
  coordinator's other services.

Without either the components refuse to start, unless ``internal.insecure: true``
says the plane is meant to be open.  The gRPC health service stays open (load
balancers and container probes call it; it tells only SERVING or not).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import grpc
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from cyllm.settings import ComponentSettings, load_settings

AUTH_KEY = "authorization"
ROLES = ("gateway", "coordinator", "worker")
_OPEN = "/grpc.health.v1.Health/"

# gRPC's defaults (4 MiB in) refuse a long prompt with a bare RESOURCE_EXHAUSTED; the
# gateway bounds what users send, so the plane takes what the gateway lets through.
MAX_MESSAGE_BYTES = 64 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class InternalSettings(ComponentSettings):
    section: ClassVar[str] = "internal"
    model_config = SettingsConfigDict(env_prefix="CYLLM_INTERNAL_", extra="forbid")

    token: SecretStr | None = Field(None, description="shared secret every internal call carries")
    token_file: Path | None = Field(None, description="the token, read from a file (a mounted Secret)")
    tls_ca_file: Path | None = Field(None, description="CA that signs every component's certificate")
    tls_cert_file: Path | None = Field(None, description="this component's certificate (PEM)")
    tls_key_file: Path | None = Field(None, description="this component's private key (PEM)")
    tls_server_name: str | None = Field(
        None,
        description="name to verify in servers' certificates when dialling an address that is not in them",
    )
    insecure: bool = Field(False, description="run the internal plane without authentication")

    @model_validator(mode="after")
    def _complete(self) -> InternalSettings:
        tls = [self.tls_ca_file, self.tls_cert_file, self.tls_key_file]
        if any(tls) and not all(tls):
            raise ValueError("mutual TLS needs all three of tls_ca_file, tls_cert_file, tls_key_file")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if not (self.insecure or self.token or self.token_file or all(tls)):
            raise ValueError(
                "the internal gRPC plane needs credentials: set internal.token (or token_file, or "
                "CYLLM_INTERNAL_TOKEN), or internal.tls_* files (cyllm certs makes them); "
                "internal.insecure: true runs it open"
            )
        return self

    def plane(self) -> Plane:
        token = self.token.get_secret_value() if self.token else None
        if self.token_file is not None:
            token = self.token_file.read_text().strip()
        if token is not None and len(token) < 16:
            raise ValueError("the internal token must be at least 16 characters")
        tls = None
        if self.tls_ca_file is not None:
            assert self.tls_cert_file is not None and self.tls_key_file is not None  # _complete: all three
            tls = Tls(
                self.tls_ca_file.read_bytes(),
                self.tls_cert_file.read_bytes(),
                self.tls_key_file.read_bytes(),
                self.tls_server_name,
            )
        return Plane(token, tls)


WORKER_URI = "cyllm://worker/"  # a worker's id among its certificate's names (certs.py)


@dataclass(frozen=True)
class WorkerIdentity:
    """What a per-worker certificate says: the one worker it may act as, and the hosts
    whose addresses it may register."""

    worker_id: str
    hosts: frozenset[str]

    def may_register(self, worker_id: str, address: str) -> str | None:
        """Why this certificate may not register ``worker_id`` at ``address``, or None."""
        if worker_id != self.worker_id:
            return f"a certificate of worker {self.worker_id!r} may not act as worker {worker_id!r}"
        host = address.rsplit(":", 1)[0].strip("[]").lower()
        if host not in self.hosts:
            return f"worker {worker_id!r} may register only at an address of its certificate's hosts"
        return None


@dataclass(frozen=True)
class Tls:
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str | None = None


@dataclass(frozen=True)
class Plane:
    """The credentials of this process on the internal plane."""

    token: str | None = None
    tls: Tls | None = None

    @property
    def open(self) -> bool:
        return self.token is None and self.tls is None

    # -- serving ---------------------------------------------------------------------------

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        creds = grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca, require_client_auth=True
        )
        return server.add_secure_port(address, creds)

    def token_sent(self, method: str, metadata: Any) -> bool:
        """Whether a call's metadata carries the token (or none is needed): read before
        its message is."""
        if self.token is None or method.startswith(_OPEN):
            return True
        sent = dict(metadata or ()).get(AUTH_KEY, "")
        return hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode())

    def check(self, method: str, context: grpc.aio.ServicerContext) -> str | None:
        """Why the caller may not make this call, or None when it may."""
        if method.startswith(_OPEN):
            return None
        if not self.token_sent(method, context.invocation_metadata()):
            return "missing or wrong internal token"
        if self.tls is not None:
            names = (context.auth_context() or {}).get("x509_common_name") or []
            role = names[0].decode() if names else ""
            if role not in _allowed(method):
                return f"a {role or 'certificate without a role'} may not call {method}"
        return None

    def worker_named(self, context: grpc.aio.ServicerContext) -> WorkerIdentity | None:
        """The worker the caller's certificate names (``cyllm certs --worker-id``), and
        the hosts it names; None when its credentials name no worker (the token, a
        role's certificate)."""
        if self.tls is None:
            return None
        auth = context.auth_context() or {}
        ids = [
            u.decode()[len(WORKER_URI) :]
            for u in auth.get("peer_uri", [])
            if u.decode().startswith(WORKER_URI)
        ]
        if not ids:
            return None
        hosts = {h.decode().lower() for h in auth.get("peer_dns", []) + auth.get("peer_ip", [])}
        return WorkerIdentity(ids[0], frozenset(hosts))

    # -- calling ---------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.aio.Channel:
        if self.tls is None:
            channel = grpc.aio.insecure_channel(address, options=_OPTIONS)
        else:
            channel = grpc.aio.secure_channel(address, self._credentials(), options=_OPTIONS + self._names())
        return _TokenChannel(channel, self.token) if self.token else channel

    def sync_channel(self, address: str) -> grpc.Channel:
        """A blocking channel (``cyllm probe``); the health service needs no token."""
        if self.tls is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, self._credentials(), options=self._names())

    def _credentials(self) -> grpc.ChannelCredentials:
        assert self.tls is not None
        return grpc.ssl_channel_credentials(self.tls.ca, self.tls.key, self.tls.cert)

    def _names(self) -> list[tuple[str, str]]:
        """The name to verify in servers' certificates, when it is not the address's."""
        name = self.tls.server_name if self.tls else None
        return [("grpc.ssl_target_name_override", name)] if name else []


SERVER_OPTIONS = _OPTIONS


def _allowed(method: str) -> tuple[str, ...]:
    """The roles that may call ``method`` (``/cyllm.v1.<Service>/<Method>``)."""
    service = method.rpartition("/")[0].rpartition(".")[2]
    if service == "Worker":
        return ("coordinator",)
    if service == "WorkerPool":
        return ("worker",)
    return ("gateway",)


def load_plane(config_file: Path | None = None) -> Plane:
    """This process's credentials from the ``internal`` section and ``CYLLM_INTERNAL_*``."""
    return load_settings(InternalSettings, config_file).plane()


# -- the token on every outgoing call ------------------------------------------------------


class _TokenChannel:
    """A channel whose every call carries the token.  Each method's callable adds it, not
    a client interceptor: grpc.aio runs every intercepted call through an extra task and
    iterator, about a twentieth of a request's CPU in the gateway."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._channel = channel
        self._auth = ((AUTH_KEY, f"Bearer {token}"),)

    def unary_unary(self, *args: Any, **kwargs: Any) -> _Authed:
        return _Authed(self._channel.unary_unary(*args, **kwargs), self._auth)

    def unary_stream(self, *args: Any, **kwargs: Any) -> _Authed:
        return _Authed(self._channel.unary_stream(*args, **kwargs), self._auth)

    def stream_unary(self, *args: Any, **kwargs: Any) -> _Authed:
        return _Authed(self._channel.stream_unary(*args, **kwargs), self._auth)

    def stream_stream(self, *args: Any, **kwargs: Any) -> _Authed:
        return _Authed(self._channel.stream_stream(*args, **kwargs), self._auth)

    def __getattr__(self, name: str) -> Any:  # close, channel_ready, get_state, ...
        return getattr(self._channel, name)

    async def __aenter__(self) -> _TokenChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()


class _Authed:
    def __init__(self, method: Callable[..., Any], auth: tuple[tuple[str, str], ...]) -> None:
        self._method = method
        self._auth = auth

    def __call__(self, *request: Any, metadata: Any = None, **kwargs: Any) -> Any:
        # no request: a client-streaming call written to with ``write``
        return self._method(*request, metadata=tuple(metadata or ()) + self._auth, **kwargs)
