"""Gateway settings."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from cyllm.gateway.budgets import Budget
from cyllm.settings import ComponentSettings


class GatewaySettings(ComponentSettings):
    section: ClassVar[str] = "gateway"
    model_config = SettingsConfigDict(env_prefix="CYLLM_GATEWAY_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the HTTP server binds; 0.0.0.0 for every interface")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port (0 picks a free one)")
    coordinators: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:50050"],
        min_length=1,
        description="coordinators as host:port, used in turn; an unreachable one is skipped",
    )
    embedded_coordinator: str | None = Field(
        None,
        description="host:port: run a coordinator (its own section's settings) inside "
        "the gateway's process, serving gRPC there for workers and tools; the gateway then "
        "calls only it, with no gRPC hop (coordinators is not used)",
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger bodies get 413")
    max_upload_bytes: int = Field(512 << 20, ge=1024, description="largest POST /v1/files upload")
    request_timeout_s: float = Field(600.0, gt=0, description="whole-request limit")
    tls_cert_file: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    tls_key_file: Path | None = Field(None, description="the certificate's private key (PEM)")
    # -- who may call
    auth_enabled: bool = Field(False, description="require an API key or a JWT on every route")
    api_keys_file: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "cyllm" / "api-keys.json",
        description="key store when no redis_url is set",
    )
    redis_url: str | None = Field(None, description="shared key store and rate-limit counters")
    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret")
    jwt_public_key_file: Path | None = Field(None, description="RS256 public key (PEM)")
    jwt_jwks_file: Path | None = Field(None, description="RS256 keys as a JWKS file (by kid)")
    jwt_issuer: str | None = Field(None, description="a JWT's iss must equal this (unset: not checked)")
    jwt_audience: str | None = Field(None, description="a JWT's aud must hold this (unset: not checked)")
    admin_scope: str = Field(
        "admin", description="the JWT scope (or API key flag) that opens the admin routes"
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host names requests may use (DNS rebinding); '*': any; default: the "
        "loopback names on a loopback address, any on every interface",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="web pages (origins, e.g. https://app.example) other than the gateway's own "
        "that may call it from a browser; answered with CORS",
    )
    metrics_public: bool = Field(True, description="serve metrics without credentials")
    log_content: bool = Field(False, description="put prompts and completions in the access log")
    # -- how much (per API key or JWT subject; null: unlimited)
    rate_limit_rpm: int | None = Field(None, ge=1, description="requests per minute")
    rate_limit_tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    rate_limit_concurrency: int | None = Field(64, ge=1, description="generations at once")
    tpm_default_reserve: int = Field(
        256,
        ge=1,
        description="tokens reserved for a request without max_tokens, while it runs (rate_limit_tpm)",
    )
    usage_report_s: float = Field(
        2.0, gt=0, le=60, description="how often this gateway reports its requests' usage to the ledger"
    )
    budgets: dict[str, Budget] = Field(
        default_factory=dict,
        description="budgets by caller ('jwt:<sub>', 'key:<id>', 'anonymous'); a key's own budget "
        "(cyllm keys create --budget) comes first",
    )
    batch_concurrency: int = Field(
        2, ge=0, le=256, description="a batch's requests this gateway runs at once (0: it runs no batches)"
    )
    batch_poll_s: float = Field(2.0, gt=0, le=60, description="how often an idle gateway asks for a batch")
    rate_limit_control_rpm: int | None = Field(
        120, ge=1, description="requests per minute to files, training and admin routes"
    )
