"""Which browser pages may call the gateway, and by which names.

A gateway on loopback with auth off trusts its caller as the machine's own user (an
admin: ``auth.anonymous``), and it reads a body of any content type as JSON so that
``curl -d '{...}'`` works.  A web page the user happens to visit could then send a
"simple" cross-site POST (no CORS preflight) to ``http://localhost:8080`` and create a
key or unload a model; through a DNS-rebinding host name it could even read the
answers.  So, before anything else runs:

* a request whose ``Host`` is not one of the gateway's names is refused (400): the
  loopback names when it listens on loopback, any name when it listens on every
  interface (then auth protects it), or ``gateway.allowed_hosts``;
* a request from a browser (``Origin``, or ``Sec-Fetch-Site: cross-site``) is refused
  (403) unless it comes from the gateway's own origin (the console) or one of
  ``gateway.allowed_origins`` — as Ollama's ``OLLAMA_ORIGINS`` and Jupyter's
  ``allow_origin`` do; those origins also get CORS answers (Starlette's middleware).

A terminal's curl, an SDK and a server-side proxy send no ``Origin``: they are not
affected.  WebSocket handshakes are checked the same way (browsers send ``Origin`` on
them, and CORS does not apply to WebSockets).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from cyllm import errors
from cyllm.gateway.auth import loopback
from cyllm.gateway.context import BATCH_CALLER
from cyllm.gateway.errors import error_response

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _host_name(value: str) -> str:
    """The host of a ``Host`` header or an origin's netloc, without port or brackets."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class BrowserGuard:
    def __init__(
        self, app: ASGIApp, bind_host: str, allowed_hosts: list[str] | None, allowed_origins: list[str]
    ) -> None:
        """``bind_host``: the address the gateway listens on (its default names)."""
        self.app = app
        if allowed_hosts is None:
            allowed_hosts = list(LOOPBACK_NAMES) if loopback(bind_host) else ["*"]
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower() for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or BATCH_CALLER in scope:  # in-process: no browser
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self._refusal(headers)
        if refused is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # refused before the handshake is accepted
            await receive()
            return await send({"type": "websocket.close", "code": 1008})
        return await error_response(refused)(scope, receive, send)

    def _refusal(self, headers: dict[str, str]) -> errors.CyllmError | None:
        host = headers.get("host", "")  # none: not a browser (every browser sends one)
        name = _host_name(host.lower())
        if host and not self.any_host and name not in self.hosts:
            return errors.InvalidRequest(
                f"Host {host[:100]!r} is not a name of this server; its names are "
                f"{', '.join(sorted(self.hosts))} (gateway.allowed_hosts)",
                param="Host",
            )
        origin = headers.get("origin")
        if origin is None:
            if headers.get("sec-fetch-site") == "cross-site":
                return errors.Forbidden(
                    "a cross-site request from a browser page is not allowed (gateway.allowed_origins)"
                )
            return None
        if origin.lower() in self.origins or urlsplit(origin).netloc.lower() == host.lower():
            return None
        return errors.Forbidden(
            f"requests from the web page at {origin[:100]} are not allowed; "
            "gateway.allowed_origins lists the pages that may call this server"
        )
