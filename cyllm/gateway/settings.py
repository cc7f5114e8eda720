"""Gateway settings."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from cyllm.settings import ComponentSettings


class GatewaySettings(ComponentSettings):
    section: ClassVar[str] = "gateway"
    model_config = SettingsConfigDict(env_prefix="CYLLM_GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    coordinators: list[str] = Field(default_factory=lambda: ["127.0.0.1:50050"], min_length=1)
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger bodies get 413")
    request_timeout_s: float = Field(600.0, gt=0, description="whole-request limit")
