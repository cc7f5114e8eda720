"""The server commands: ``serve`` (all three components), each component alone, and the
operator's tools (probe, certs, keys on the store, prepare-models)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from cyllm import tracing
from cyllm.cli.root import ConfigFile, app
from cyllm.runtime import setup_logging
from cyllm.settings import ConfigError, load_settings

Host = Annotated[str | None, typer.Option(help="Address to bind.", show_default=False)]
Port = Annotated[int | None, typer.Option(help="Port to bind.", show_default=False)]
Coordinators = Annotated[
    list[str] | None,
    typer.Option(
        "--coordinator",
        metavar="HOST:PORT",
        show_default=False,
        help="A coordinator to register with (repeatable).",
    ),
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
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="A local Hugging Face folder, a .gguf file, or a Hugging Face Hub id (org/name"
            "[@revision], downloaded once). Default: the models of --config, else the built-in "
            "SmolLM2-135M-Instruct.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address the HTTP gateway binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port of the gateway.")] = 8080,
    coordinator_port: Annotated[int, typer.Option(help="gRPC port of the coordinator.")] = 50050,
    worker_port: Annotated[int, typer.Option(help="gRPC port of the worker.")] = 50051,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            help="The id clients name the model by. Default: the Hub id, or the folder's or file's name.",
            show_default=False,
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            help="auto, transformers, vllm, llama_cpp, … (default auto: the fastest installed "
            "for the hardware).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda, cuda:N, npu, npu:N.", show_default=False)
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto, float32, bfloat16, float16.", show_default=False)
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(min=1, help="Sequences decoded together (default 32).", show_default=False)
    ] = None,
    max_context: Annotated[
        int | None, typer.Option(min=16, help="Tokens of context, below the model's own.", show_default=False)
    ] = None,
    config: ConfigFile = None,
) -> None:
    """Run gateway, coordinator and worker together on this machine (the embedded default).

    With MODEL, the worker serves that model instead of the config's list; the config
    file still sets everything else.
    """
    from cyllm import supervisor
    from cyllm.cli.sources import SourceError, model_spec

    flags = {
        "engine": engine,
        "device": device,
        "dtype": dtype,
        "max_batch_size": max_batch_size,
        "max_context": max_context,
    }
    if model is None:
        given = [f"--{k.replace('_', '-')}" for k, v in flags.items() if v is not None]
        if given or served_model_name:
            typer.echo(f"error: {', '.join(given or ['--served-model-name'])} need(s) MODEL", err=True)
            raise typer.Exit(2)
        models = None
    else:
        try:
            models = [model_spec(model, served_model_name, **flags)]
        except SourceError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"serving {models[0].id} from {models[0].path or models[0].gguf}", err=True)
    raise typer.Exit(supervisor.run(host, port, coordinator_port, worker_port, config, models))


@app.command()
def gateway(
    host: Host = None,
    port: Port = None,
    config: ConfigFile = None,
    coordinator: Coordinators = None,
    embed_coordinator: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT",
            show_default=False,
            help="Run a coordinator inside this process, its gRPC server on HOST:PORT (for "
            "workers and tools); the gateway calls it without a network hop.",
        ),
    ] = None,
) -> None:
    """Run the HTTP gateway (default port 8080)."""
    from cyllm.gateway.main import serve as run
    from cyllm.gateway.settings import GatewaySettings

    setup_logging()
    tracing.setup("cyllm-gateway")
    settings = _load(
        GatewaySettings,
        config,
        host=host,
        port=port,
        coordinators=coordinator or None,
        embedded_coordinator=embed_coordinator,
    )
    hosted = None
    if settings.embedded_coordinator:
        chost, _, cport = settings.embedded_coordinator.rpartition(":")
        if not chost or not cport.isdigit():
            typer.echo(
                f"error: embedded_coordinator: {settings.embedded_coordinator!r} is not HOST:PORT", err=True
            )
            raise typer.Exit(2)
        from cyllm.coordinator.settings import CoordinatorSettings

        hosted = _load(CoordinatorSettings, config, host=chost, port=int(cport))
    run(settings, _plane(config), hosted)


@app.command()
def coordinator(
    host: Host = None,
    port: Port = None,
    config: ConfigFile = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            show_default=False,
            help="redis://HOST:PORT/DB: share queue, cache and workers with other coordinators.",
        ),
    ] = None,
) -> None:
    """Run the coordinator (gRPC, default port 50050)."""
    from cyllm.coordinator.main import serve as run
    from cyllm.coordinator.settings import CoordinatorSettings

    setup_logging()
    tracing.setup("cyllm-coordinator")
    asyncio.run(
        run(_load(CoordinatorSettings, config, host=host, port=port, redis_url=redis_url), _plane(config))
    )


@app.command()
def worker(
    host: Host = None, port: Port = None, config: ConfigFile = None, coordinator: Coordinators = None
) -> None:
    """Run a worker (gRPC, default port 50051) with the models of the config."""
    from cyllm.worker.main import serve as run
    from cyllm.worker.settings import WorkerSettings

    setup_logging()
    tracing.setup("cyllm-worker")
    asyncio.run(
        run(
            _load(WorkerSettings, config, host=host, port=port, coordinators=coordinator or None),
            _plane(config),
        )
    )


@app.command()
def probe(
    address: Annotated[str, typer.Argument(help="HOST:PORT of a coordinator or worker")],
    config: ConfigFile = None,
) -> None:
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
    role: Annotated[
        list[str] | None,
        typer.Option(metavar="ROLE", help="gateway, coordinator or worker (repeatable); default: all three"),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="HOST",
            help="a name or address the component is dialled by (repeatable); default: this machine",
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="certificate lifetime")] = 365,
    worker_id: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ID",
            help="issue worker-ID.pem naming that worker (repeatable): it may register as ID "
            "only, at an address among the hosts",
        ),
    ] = None,
) -> None:
    """Make the internal plane's CA (if absent) and a certificate per component role."""
    from cyllm.certs import default_hosts, issue
    from cyllm.protocol.plane import ROLES

    hosts = default_hosts() + list(host or [])
    wanted: list[tuple[str, str | None]] = [(name, None) for name in role or ([] if worker_id else ROLES)]
    wanted += [("worker", wid) for wid in worker_id or ()]
    for name, wid in wanted:
        try:
            cert, key = issue(out, name, hosts, days, wid)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"{name}{f' {wid}' if wid else ''}: {cert} {key}")
    typer.echo(f"CA: {out / 'ca.pem'} (keep {out / 'ca.key'} off the serving machines)")


keys_app = typer.Typer(
    no_args_is_help=True,
    help=(
        "Manage API keys: over HTTP with an admin key (--url or CYLLM_URL), or directly on "
        "the key store (--config, or neither)."
    ),
)
app.add_typer(keys_app, name="keys")

KeysUrl = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="CYLLM_URL",
        show_default=False,
        help="A gateway: manage keys through its admin API (with --api-key).",
    ),
]
AdminKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="CYLLM_API_KEY", show_default=False, help="An admin API key or JWT."),
]


BudgetOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="LIMIT=N",
        help="A budget limit (repeatable): tokens_per_day, tokens_per_month, "
        "device_seconds_per_month, warn_at (a share, default 0.8).",
        show_default=False,
    ),
]


def _budget(limits: list[str] | None) -> dict | None:
    """``--budget tokens_per_day=100000 ...`` as the budget's fields, checked."""
    if not limits:
        return None
    from pydantic import ValidationError

    from cyllm.gateway.budgets import Budget

    fields = {}
    for item in limits:
        name, sep, value = item.partition("=")
        if not sep:
            typer.echo(f"error: --budget {item!r}: write LIMIT=N, e.g. tokens_per_day=100000", err=True)
            raise typer.Exit(2)
        fields[name.strip().replace("-", "_")] = value.strip()
    try:
        return Budget.model_validate(fields).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: --budget: {problems}", err=True)
        raise typer.Exit(2) from None


def _store(config: Path | None):
    from cyllm.gateway.app import key_store
    from cyllm.gateway.settings import GatewaySettings

    return key_store(_load(GatewaySettings, config))


def _over_http(url: str | None, api_key: str | None, config: Path | None):
    """The gateway to call, or None to use the store (a --config always means the store)."""
    if url is None or config is not None:
        return None
    from cyllm.cli.client import Gateway

    return Gateway(url, api_key)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    admin: Annotated[bool, typer.Option(help="May manage keys and the other admin routes.")] = False,
    model: Annotated[
        list[str] | None,
        typer.Option(
            metavar="MODEL", help="A model the key may use (repeatable); default: all.", show_default=False
        ),
    ] = None,
    expires_in_days: Annotated[
        float | None, typer.Option(min=0.001, help="Lifetime; default: no expiry.", show_default=False)
    ] = None,
    budget: BudgetOption = None,
    config: ConfigFile = None,
    url: KeysUrl = None,
    api_key: AdminKey = None,
) -> None:
    """Create a key and print it (the only time it is shown in clear)."""
    expires = expires_in_days * 86400 if expires_in_days else None
    limits = _budget(budget)
    gw = _over_http(url, api_key, config)
    if gw is not None:
        reply = gw.call(
            "POST",
            "/admin/keys",
            json={"name": name, "admin": admin, "models": model, "expires_in_s": expires, "budget": limits},
        )
        key_id, secret = reply["key_id"], reply["key"]
    else:
        key, secret = asyncio.run(
            _store(config).create(name, admin=admin, models=model, expires_in_s=expires, budget=limits)
        )
        key_id = key.key_id
    typer.echo(f"created {key_id} ({name}); the key, shown once:")
    typer.echo(secret)


@keys_app.command("budget")
def keys_budget(
    key_id: Annotated[str, typer.Argument(help="The key's id (not its secret).")],
    budget: BudgetOption = None,
    clear: Annotated[bool, typer.Option(help="Take the key's budget away.")] = False,
    config: ConfigFile = None,
    url: KeysUrl = None,
    api_key: AdminKey = None,
) -> None:
    """Set (--budget) or clear (--clear) a key's budget; it applies from its next request."""
    if clear == bool(budget):
        typer.echo("error: give --budget, or --clear", err=True)
        raise typer.Exit(2)
    limits = _budget(budget)
    gw = _over_http(url, api_key, config)
    if gw is not None:
        path = f"/admin/keys/{key_id}/budget"
        gw.call("DELETE", path) if clear else gw.call("PUT", path, json=limits)
    elif asyncio.run(_store(config).set_budget(key_id, limits)) is None:
        typer.echo(f"error: no API key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{key_id}: {'no budget' if clear else limits}")


@keys_app.command("list")
def keys_list(config: ConfigFile = None, url: KeysUrl = None, api_key: AdminKey = None) -> None:
    """List keys, one JSON object per line (never their secrets)."""
    import json

    gw = _over_http(url, api_key, config)
    keys = (
        gw.call("GET", "/admin/keys")["keys"]
        if gw is not None
        else [k.public() for k in asyncio.run(_store(config).all())]
    )
    for key in keys:
        typer.echo(json.dumps(key))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (not its secret).")],
    config: ConfigFile = None,
    url: KeysUrl = None,
    api_key: AdminKey = None,
) -> None:
    """Revoke a key; it stops working at once."""
    gw = _over_http(url, api_key, config)
    if gw is not None:
        gw.call("DELETE", f"/admin/keys/{key_id}")
    elif not asyncio.run(_store(config).revoke(key_id)):
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
