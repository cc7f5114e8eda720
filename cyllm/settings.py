"""Loading of component settings: YAML file < ``.env`` < environment < command line.

Each component owns one ``pydantic-settings`` model (``GatewaySettings``,
``CoordinatorSettings``, ``WorkerSettings``) beside its code.  This module only knows
how to fill one from a section of the YAML config file.  The file looks like::

    gateway:     {port: 8080, coordinators: ["127.0.0.1:50050"]}
    coordinator: {port: 50050, queue_max_size: 256}
    worker:      {port: 50051, coordinators: ["127.0.0.1:50050"]}
    models:      [{id: my-model, path: /models/my-model}]   # read by the worker
    dataset_formatters: ["mycorp.formats:QA"]               # coordinator and workers
    internal:    {token_file: /run/secrets/cyllm-internal}  # every component: plane.py

Environment variables override the file: ``CYLLM_<SECTION>_<FIELD>`` (lists and dicts
as JSON), e.g. ``CYLLM_COORDINATOR_QUEUE_MAX_SIZE=64``; so does a ``.env`` file in the
working directory holding such variables (the environment wins over it), as operators
keep them: ``.env.example`` lists every one (``python -m cyllm.config_reference
--env``).  A bad value stops start-up with pydantic's message naming the key.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

SHARED = ("models", "dataset_formatters")  # top-level keys read by every section that has them
_config_file: ContextVar[Path | None] = ContextVar("cyllm_config_file", default=None)


class ConfigError(Exception):
    """The config file or a setting is invalid; the message says which and why."""


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    unknown = set(data) - {"gateway", "coordinator", "worker", "internal", *SHARED}
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown section(s) {sorted(unknown)}; "
            f"allowed: gateway, coordinator, worker, internal, {', '.join(SHARED)}"
        )
    return data


class _YamlSection(PydanticBaseSettingsSource):
    """The component's section of the file in ``_config_file`` (lowest precedence)."""

    def __init__(self, settings_cls: type[BaseSettings], section: str) -> None:
        super().__init__(settings_cls)
        self.section = section

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole section

    def __call__(self) -> dict[str, Any]:
        data = read_config_file(_config_file.get())
        section = dict(data.get(self.section, None) or {})
        # Shared by name, so that one file describes the fleet: the models list, and the
        # dataset formatters the coordinator checks with and the workers train with.
        for key in SHARED:
            if key in self.settings_cls.model_fields and key in data:
                section.setdefault(key, data[key])
        return section


class _OwnDotEnv(PydanticBaseSettingsSource):
    """``.env``'s values for this component: one file holds every component's variables,
    and another's are not this one's unknown keys (a misspelt one of its own still is)."""

    def __init__(self, inner: PydanticBaseSettingsSource) -> None:
        super().__init__(inner.settings_cls)
        self.inner = inner

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        prefix = str(self.settings_cls.model_config.get("env_prefix", "")).lower()
        fields = self.settings_cls.model_fields
        return {k: v for k, v in self.inner().items() if k in fields or (prefix and k.startswith(prefix))}


class ComponentSettings(BaseSettings):
    """Base for one component's settings; subclasses set ``section`` and env_prefix."""

    section: ClassVar[str] = ""
    model_config = SettingsConfigDict(extra="forbid", env_file=".env", env_file_encoding="utf-8")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _OwnDotEnv(dotenv_settings),
            _YamlSection(settings_cls, cls.section),
        )


S = TypeVar("S", bound=ComponentSettings)


def load_settings(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build ``cls`` from file, environment and ``overrides`` (None values are skipped)."""
    token = _config_file.set(config_file)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        where = f" (config file {config_file})" if config_file else ""
        # Named, never quoted: a misspelt secret's value must not reach a log.
        said = "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '(settings)'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid {cls.section} settings{where}:\n{said}") from exc
    finally:
        _config_file.reset(token)
