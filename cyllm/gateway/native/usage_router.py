"""``GET /api/v1/usage``: the usage ledger, added up by period and by caller, model, route
or outcome — a tenant's own rows, an admin's choice of everyone's or one caller's; JSON
or CSV.  ``GET /api/v1/usage/budget``: the caller's budget and what it has spent (an
admin sets a key's in ``admin.py``)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import Field

from cyllm import errors
from cyllm.coordinator.ledger import GROUPS, SUMS
from cyllm.gateway.budgets import PERIODS, Budget, period_bounds
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import context
from cyllm.gateway.errors import responses
from cyllm.gateway.native.training_schemas import Camel
from cyllm.gateway.ratelimit import limit_control
from cyllm.protocol import pb

router = APIRouter(prefix="/api/v1/usage", tags=["usage"], dependencies=[Depends(limit_control)])
DEFAULT_DAYS = 30
LATEST = 253402300800 - 400 * 86400  # 9999-12-31, less the widest range


class UsageEntry(Camel):
    start: str | None = Field(description="the period's start (UTC, ISO 8601) when grouped by one")
    subject: str | None = None
    model: str | None = None
    route: str | None = None
    outcome: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    trained_tokens: int
    device_seconds: float


class UsageReport(Camel):
    object: Literal["usage"] = "usage"
    start: str = Field(serialization_alias="from")
    end: str = Field(serialization_alias="to")
    group_by: list[str]
    data: list[UsageEntry]
    total: UsageEntry
    truncated: bool = Field(description="more groups than one answer holds: narrow the range or group less")


def _time(value: str | None, param: str, default: float) -> int:
    """Unix seconds, or an ISO 8601 date or time (UTC unless it says otherwise)."""
    if value is None or value == "":
        return int(default)
    try:
        t = int(float(value)) if value.replace(".", "", 1).isdigit() else _iso(value)
        if not 0 <= t < LATEST:
            raise ValueError(value)
        return t
    except (ValueError, OverflowError):
        raise errors.InvalidRequest(
            f"{param}: a date (2026-12-01), a time (2026-12-01T12:00:00Z) or unix seconds, from 1970 to 9999",
            param=param,
        ) from None


def _iso(value: str) -> int:
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def _stamp(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entry(row: pb.UsageRow, grouped: list[str], periodic: bool) -> UsageEntry:
    def key(name: str) -> str | None:
        return getattr(row, name) if name in grouped else None

    return UsageEntry(
        start=_stamp(row.start) if periodic else None,
        subject=key("subject"),
        model=key("model"),
        route=key("route"),
        outcome=key("outcome"),
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        total_tokens=row.prompt_tokens + row.completion_tokens,
        cached_tokens=row.cached_tokens,
        trained_tokens=row.trained_tokens,
        device_seconds=round(row.device_seconds, 3),
    )


@router.get(
    "",
    response_model=UsageReport,
    response_model_by_alias=True,
    responses=responses(400, 401, 403, 429, 503)
    | {200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "the rows"}},
)
async def usage(
    request: Request,
    start: Annotated[str | None, Query(alias="from", description="default: 30 days before 'to'")] = None,
    end: Annotated[str | None, Query(alias="to", description="default: now")] = None,
    group_by: Annotated[
        str,
        Query(description=f"comma-separated, of {', '.join(GROUPS)} (one period at most)", max_length=200),
    ] = "day",
    subject: Annotated[
        str | None, Query(description="one caller's (admins; a tenant always reads its own)", max_length=300)
    ] = None,
    format: Annotated[Literal["json", "csv"], Query()] = "json",
) -> UsageReport | Response:
    """What callers used, from the ledger (who, which model and route, tokens and training
    device-seconds; hour by hour, added up as asked)."""
    caller = context(request).caller
    to = _time(end, "to", time.time())
    since = _time(start, "from", to - DEFAULT_DAYS * 86400)
    grouped = [g.strip() for g in group_by.split(",") if g.strip()]
    if subject and not caller.admin and subject != caller.subject:
        raise errors.Forbidden(
            "a caller reads its own usage; another's needs the admin scope", param="subject"
        )
    report = await coordinator(request).query_usage(
        pb.UsageQuery(start=since, end=to, group_by=grouped, subject=subject or "")
    )
    periodic = any(g in ("hour", "day", "month") for g in grouped)
    data = [_entry(row, grouped, periodic) for row in report.rows]
    if format == "csv":
        return Response(_csv(data, grouped, periodic), media_type="text/csv; charset=utf-8")
    return UsageReport(
        start=_stamp(since),
        end=_stamp(to),
        group_by=grouped,
        data=data,
        total=_entry(report.total, [], False),
        truncated=report.truncated,
    )


def _csv(data: list[UsageEntry], grouped: list[str], periodic: bool) -> str:
    keys = (["start"] if periodic else []) + [
        k for k in ("subject", "model", "route", "outcome") if k in grouped
    ]
    sums = [*SUMS[:3], "total_tokens", *SUMS[3:]]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(keys + sums)
    for entry in data:
        # a cell that a spreadsheet would run as a formula is quoted as text
        writer.writerow([_cell(getattr(entry, k)) for k in keys] + [getattr(entry, s) for s in sums])
    return out.getvalue()


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class PeriodSpending(Camel):
    limit: int | None
    spent: int
    resets_at: str


class BudgetView(Camel):
    subject: str
    budget: Budget | None
    tokens: dict[str, PeriodSpending]
    device_seconds: float = Field(description="training device-seconds this month")


@router.get(
    "/budget", response_model=BudgetView, response_model_by_alias=True, responses=responses(401, 429, 503)
)
async def budget(request: Request) -> BudgetView:
    """The caller's budget and what the ledger has of its spending this UTC day and month
    (requests still running and the last seconds not yet reported are not in it)."""
    caller = context(request).caller
    client = request.app.state.client
    now = time.time()
    tokens = {}
    device_seconds = 0.0
    for period in PERIODS:
        start, end = period_bounds(period, now)
        spent, device = await client.spent_since(caller.subject, start)
        if period == "month":
            device_seconds = device
        limit = caller.budget.tokens(period) if caller.budget else None
        tokens[period] = PeriodSpending(limit=limit, spent=spent, resets_at=_stamp(end))
    return BudgetView(
        subject=caller.subject, budget=caller.budget, tokens=tokens, device_seconds=device_seconds
    )
