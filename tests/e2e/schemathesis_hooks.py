"""A check schemathesis runs beside its own (``SCHEMATHESIS_HOOKS``): no error answer is
larger than ``BOUND`` — an error names the first few problems and a count, never one
line per bad element of a hostile body."""

from __future__ import annotations

import schemathesis

BOUND = 16 * 1024


@schemathesis.check
def bounded_error_answer(ctx, response, case) -> None:
    if response.status_code >= 400 and len(response.content) > BOUND:
        raise AssertionError(f"an error answer of {len(response.content)} bytes, over {BOUND}")
