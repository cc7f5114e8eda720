"""The ``cyllm`` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cyllm.runtime import setup_logging
from cyllm.settings import ConfigError, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="CY-LLM: serve and fine-tune LLMs.")

Host = Annotated[Optional[str], typer.Option(help="address to bind")]
ConfigFile = Annotated[
    Optional[Path], typer.Option("--config", exists=True, dir_okay=False, help="YAML config file")
]
Coordinators = Annotated[
    Optional[list[str]],
    typer.Option("--coordinator", help="coordinator HOST:PORT (repeatable)"),
]


def _load(cls, config: Path | None, **overrides):
    try:
        return load_settings(cls, config, **overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _plane(config: Path | None):
    """This process's credentials on the internal gRPC plane (``internal`` section)."""
    from cyllm.protocol.plane import InternalSettings

    try:
        return _load(InternalSettings, config).plane()
    except (OSError, ValueError) as exc:
        typer.echo(f"error: internal plane credentials: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address the HTTP gateway binds")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the gateway")] = 8080,
    coordinator_port: Annotated[int, typer.Option(help="gRPC port of the coordinator")] = 50050,
    worker_port: Annotated[int, typer.Option(help="gRPC port of the worker")] = 50051,
    config: ConfigFile = None,
) -> None:
    """Run gateway, coordinator and worker together (the embedded default)."""
    from cyllm import supervisor

    raise typer.Exit(supervisor.run(host, port, coordinator_port, worker_port, config))


@app.command()
def gateway(host: Host = None, port: Annotated[Optional[int], typer.Option()] = None,
            config: ConfigFile = None, coordinator: Coordinators = None) -> None:
    """Run the HTTP gateway (default port 8080)."""
    from cyllm.gateway.main import serve as run
    from cyllm.gateway.settings import GatewaySettings

    setup_logging()
    run(_load(GatewaySettings, config, host=host, port=port, coordinators=coordinator or None),
        _plane(config))


@app.command()
def coordinator(
    host: Host = None,
    port: Annotated[Optional[int], typer.Option()] = None,
    config: ConfigFile = None,
    redis_url: Annotated[Optional[str], typer.Option(
        help="redis://HOST:PORT/DB: share queue, cache and workers with other coordinators")] = None,
) -> None:
    """Run the coordinator (gRPC, default port 50050)."""
    from cyllm.coordinator.main import serve as run
    from cyllm.coordinator.settings import CoordinatorSettings

    setup_logging()
    asyncio.run(run(_load(CoordinatorSettings, config, host=host, port=port, redis_url=redis_url),
                    _plane(config)))


@app.command()
def worker(host: Host = None, port: Annotated[Optional[int], typer.Option()] = None,
           config: ConfigFile = None, coordinator: Coordinators = None) -> None:
    """Run a worker (gRPC, default port 50051) with the models of the config."""
    from cyllm.worker.main import serve as run
    from cyllm.worker.settings import WorkerSettings

    setup_logging()
    asyncio.run(run(_load(WorkerSettings, config, host=host, port=port,
                          coordinators=coordinator or None), _plane(config)))


@app.command()
def probe(address: Annotated[str, typer.Argument(help="HOST:PORT of a coordinator or worker")],
          config: ConfigFile = None) -> None:
    """Exit 0 when the gRPC server at ADDRESS reports SERVING (container health checks)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with _plane(config).sync_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    except grpc.RpcError as exc:
        typer.echo(f"{address}: {exc.code().name}", err=True)
        raise typer.Exit(1) from None
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    typer.echo(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    raise typer.Exit(0 if serving else 1)


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="folder for ca.pem and <role>.pem/.key")] = Path("certs"),
    role: Annotated[Optional[list[str]], typer.Option(
        help="gateway, coordinator or worker (repeatable); default: all three")] = None,
    host: Annotated[Optional[list[str]], typer.Option(
        help="a name or address the component is dialled by (repeatable); default: this machine")] = None,
    days: Annotated[int, typer.Option(min=1, help="certificate lifetime")] = 365,
) -> None:
    """Make the internal plane's CA (if absent) and a certificate per component role."""
    from cyllm.certs import default_hosts, issue
    from cyllm.protocol.plane import ROLES

    hosts = default_hosts() + list(host or [])
    for name in role or ROLES:
        try:
            cert, key = issue(out, name, hosts, days)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"{name}: {cert} {key}")
    typer.echo(f"CA: {out / 'ca.pem'} (keep {out / 'ca.key'} off the serving machines)")


keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (the gateway's key store).")
app.add_typer(keys_app, name="keys")


def _store(config: Path | None):
    from cyllm.gateway.app import key_store
    from cyllm.gateway.settings import GatewaySettings

    return key_store(_load(GatewaySettings, config))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="who or what the key is for")],
    admin: Annotated[bool, typer.Option(help="may manage keys and other admin routes")] = False,
    model: Annotated[Optional[list[str]], typer.Option(help="allowed model (repeatable); default all")] = None,
    expires_in_days: Annotated[Optional[float], typer.Option(min=0.001)] = None,
    config: ConfigFile = None,
) -> None:
    """Create a key and print it (the only time it is shown in clear)."""
    expires = expires_in_days * 86400 if expires_in_days else None
    key, secret = asyncio.run(_store(config).create(name, admin=admin, models=model, expires_in_s=expires))
    typer.echo(f"created {key.key_id} ({name}); the key, shown once:")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(config: ConfigFile = None) -> None:
    """List keys (never their secrets)."""
    import json

    for key in asyncio.run(_store(config).all()):
        typer.echo(json.dumps(key.public()))


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigFile = None) -> None:
    """Revoke a key; it stops working at once."""
    if not asyncio.run(_store(config).revoke(key_id)):
        typer.echo(f"error: no API key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command("prepare-models")
def prepare_models(config: ConfigFile = None) -> None:
    """Convert and cache the configured models (GGUF -> safetensors) ahead of serving,
    for the engines that load safetensors (llama.cpp reads the GGUF as it is)."""
    from cyllm.worker import model_files
    from cyllm.worker.engines.factory import ENGINES, resolve_engine_name
    from cyllm.worker.settings import WorkerSettings

    settings = _load(WorkerSettings, config)
    for spec in settings.models:
        subs = [spec.model_copy(update={"engine": c.engine}) for c in spec.candidates] or [spec]
        if all(ENGINES[resolve_engine_name(s, settings.cpu_engine)].source != "folder" for s in subs):
            continue
        try:
            path = model_files.resolve(spec, settings.cache_dir)
        except FileNotFoundError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"{spec.id}: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
