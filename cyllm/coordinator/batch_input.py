"""A batch's input file (``purpose=batch``): one request per line, in OpenAI's shape —
``{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}``.

It is read here in full when uploaded and again when a batch is made of it (on a
thread: a file is at most ``coordinator.files_max_bytes``), so a batch never starts on a
file that would fail half-way; a wrong line is a 400 that names it.  Blank lines are
skipped, and a request's *index* (its place among the others, from 0) names it in the
results: the gateway that runs the batch counts the same way (``gateway/batch_runner``).
"""

from __future__ import annotations

import json
from pathlib import Path

from cyllm import errors

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_LINE_BYTES = 4 << 20
MAX_CUSTOM_ID = 256
MAX_META_BYTES = 16 * 600  # a batch's metadata as JSON: 16 pairs of 64 + 512 characters


def _no_constant(name: str) -> None:
    raise ValueError(name)


def check_line(raw: bytes, number: int) -> dict:
    """One line as a request, or a 400 naming ``number`` (1-based, as editors count)."""
    where = f"line {number} of the batch file"
    try:
        request = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise errors.InvalidRequest(
            f"{where} is not JSON (NaN and Infinity are not JSON)", param="file"
        ) from None
    if not isinstance(request, dict):
        raise errors.InvalidRequest(f"{where} is not a JSON object", param="file")
    custom_id, url, body = request.get("custom_id"), request.get("url"), request.get("body")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        raise errors.InvalidRequest(
            f"{where}: custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters", param="file"
        )
    if request.get("method") != "POST":
        raise errors.InvalidRequest(f"{where}: method must be POST", param="file")
    if url not in ENDPOINTS:
        raise errors.InvalidRequest(
            f"{where}: url must be one of {', '.join(ENDPOINTS)}, not {str(url)[:80]!r}", param="file"
        )
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise errors.InvalidRequest(f"{where}: body must be an object that names a model", param="file")
    if body.get("stream"):
        raise errors.InvalidRequest(f"{where}: a batch's requests cannot stream", param="file")
    return request


def read_requests(path: Path, max_requests: int, endpoint: str = "") -> int:
    """How many requests the file holds, each checked (and its url ``endpoint``, when
    given); custom ids unique."""
    seen: set[str] = set()
    number = 0
    with open(path, "rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise errors.InvalidRequest(
                    f"line {number} of the batch file is over {MAX_LINE_BYTES} bytes", param="file"
                )
            if not raw.strip():
                continue
            request = check_line(raw, number)
            if endpoint and request["url"] != endpoint:
                raise errors.InvalidRequest(
                    f"line {number} of the batch file asks for {request['url']}, but the batch is for "
                    f"{endpoint}: one batch, one endpoint",
                    param="endpoint",
                )
            if request["custom_id"] in seen:
                raise errors.InvalidRequest(
                    f"line {number} of the batch file repeats custom_id {request['custom_id']!r}",
                    param="file",
                )
            seen.add(request["custom_id"])
            if len(seen) > max_requests:
                raise errors.InvalidRequest(f"a batch holds at most {max_requests} requests", param="file")
    if not seen:
        raise errors.InvalidRequest("the batch file holds no request", param="file")
    return len(seen)


def requests(path: Path) -> list[tuple[int, str]]:
    """Each request's index and custom id (a checked file)."""
    out: list[tuple[int, str]] = []
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                out.append((len(out), json.loads(raw)["custom_id"]))
    return out
