"""``Usage``: the ledger (``coordinator/ledger.py``) on the plane.  Only a gateway's own
calls (no tenant in the metadata) may add rows: a tenant cannot write itself a smaller
bill, nor another a larger one.  A tenant reads its own rows whatever subject it names;
an admin reads everyone's, or one caller's."""

from __future__ import annotations

from cyllm import errors
from cyllm.coordinator.ledger import Ledger
from cyllm.protocol import pb, rpc
from cyllm.protocol.tenant import OPERATOR, Tenant

MAX_ROWS = 10_000  # one report from one gateway (it reports every couple of seconds)
MAX_RANGE_S = 400 * 86400


class UsageService(rpc.UsageServicer):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def RecordUsage(self, request: pb.UsageRecords, context) -> pb.UsageRecorded:
        if Tenant.of(context) != OPERATOR:
            raise errors.Forbidden("only a gateway's own calls record usage")
        if len(request.rows) > MAX_ROWS:
            raise errors.InvalidRequest(f"at most {MAX_ROWS} usage rows a call", param="rows")
        for row in request.rows:
            if min(row.requests, row.prompt_tokens, row.completion_tokens, row.cached_tokens) < 0 or (
                min(row.trained_tokens, row.device_seconds) < 0
            ):
                raise errors.InvalidRequest("usage is never negative", param="rows")
        await self.ledger.add(list(request.rows))
        return pb.UsageRecorded()

    async def QueryUsage(self, request: pb.UsageQuery, context) -> pb.UsageReport:
        tenant = Tenant.of(context)
        if request.end <= request.start:
            raise errors.InvalidRequest("'to' must be after 'from'", param="to")
        if request.end - request.start > MAX_RANGE_S:
            raise errors.InvalidRequest("at most 400 days at once", param="from")
        query = pb.UsageQuery()
        query.CopyFrom(request)
        if not tenant.admin:
            query.subject = tenant.subject
        try:
            return await self.ledger.query(query)
        except ValueError as exc:
            raise errors.InvalidRequest(str(exc), param="group_by") from None

    async def Spent(self, request: pb.BudgetSpent, context) -> pb.BudgetSpentReply:
        tenant = Tenant.of(context)
        if not tenant.owns(request.subject):
            raise errors.Forbidden("a caller reads its own spending")
        return await self.ledger.spent(request.subject, request.since)
