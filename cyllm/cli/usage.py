"""``cyllm usage``: the usage ledger from the command line — yours, or (with an admin
key) everyone's, by day, caller, model or route; a table, JSON or CSV."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cyllm.cli.client import DEFAULT_URL, ApiKey, AsJson, Gateway, Url, _listing, out
from cyllm.cli.root import app

COLUMNS = ["start", "subject", "model", "route", "outcome", "requests", "promptTokens", "completionTokens"]
COLUMNS += ["totalTokens", "cachedTokens", "trainedTokens", "deviceSeconds"]


@app.command("usage")
def usage(
    since: Annotated[
        str | None, typer.Option("--from", help="A date, time or unix seconds; default: 30 days ago.")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="Default: now.")] = None,
    group_by: Annotated[
        str, typer.Option(help="Comma-separated: hour|day|month and subject, model, route, outcome.")
    ] = "day",
    subject: Annotated[
        str | None, typer.Option(help="One caller's ('key:<id>', 'jwt:<sub>'); admins only.")
    ] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (for a spreadsheet).")] = False,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Tokens and training device-seconds used, from the gateway's usage ledger."""
    params = {"group_by": group_by, "from": since, "to": until, "subject": subject}
    params = {k: v for k, v in params.items() if v}
    gw = Gateway(url, api_key)
    if as_csv:
        reply = gw._send("GET", "/api/v1/usage", params={**params, "format": "csv"})
        if reply.status_code >= 400:
            gw.call("GET", "/api/v1/usage", params=params)  # fails with the server's message
        sys.stdout.write(reply.text)
        return
    report = gw.call("GET", "/api/v1/usage", params=params)
    if as_json:
        out.print_json(data=report)
        return
    grouped = report["groupBy"]
    shown = [c for c in COLUMNS if c not in ("start", "subject", "model", "route", "outcome") or c in grouped]
    if any(g in ("hour", "day", "month") for g in grouped):
        shown = ["start", *shown]
    keyed = shown[0] in ("start", "subject", "model", "route", "outcome")
    rows = [*report["data"], {**report["total"], shown[0]: "total"}] if keyed else [report["total"]]
    _listing(rows, shown, as_json=False)
    if report["truncated"]:
        out.print("[yellow]more groups than one answer holds: narrow the range or group by less[/]")
