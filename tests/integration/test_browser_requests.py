"""What a web page the user visits can make the local server do.  With auth off on
loopback the anonymous caller is an admin, and the gateway reads a body of any content
type as JSON (so that ``curl -d`` works): a "simple" cross-site POST needs no preflight.
Browser requests from origins that are not allowed, and requests whose Host is not one
of the server's names (DNS rebinding), are refused; a terminal's curl (no Origin) and
the console (same origin) keep working."""

from __future__ import annotations

import httpx
import pytest

from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings

KEY = b'{"name": "planted", "admin": true}'


@pytest.fixture
async def local(tmp_path):
    """An open gateway on loopback (auth off: the anonymous caller is the admin)."""

    async def make(**settings):
        app = create_app(
            GatewaySettings(api_keys_file=tmp_path / "keys.json", coordinators=["127.0.0.1:1"], **settings)
        )
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        made.append(lifespan)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost:8080")

    made: list = []
    yield make
    for lifespan in made:
        await lifespan.__aexit__(None, None, None)


async def test_a_cross_site_form_post_cannot_create_an_admin_key(local):
    http = await local()
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"}
    r = await http.post("/admin/keys", content=KEY, headers=evil)
    assert r.status_code == 403, r.text
    assert "http://evil.example" in r.json()["error"]["message"]
    # a browser that sends only Sec-Fetch-Site (no Origin) is refused alike
    r = await http.post("/admin/keys", content=KEY, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert (await http.get("/admin/keys")).json()["keys"] == []  # nothing was made


async def test_dns_rebinding_cannot_read_the_key_list(local):
    http = await local()
    r = await http.get("/admin/keys", headers={"Host": "rebound.evil.example:8080"})
    assert r.status_code == 400, r.text
    assert "rebound.evil.example" in r.json()["error"]["message"]
    # the same page, same-origin from the browser's point of view: still refused
    r = await http.get(
        "/admin/keys",
        headers={"Host": "rebound.evil.example:8080", "Origin": "http://rebound.evil.example:8080"},
    )
    assert r.status_code == 400


async def test_a_terminal_and_the_console_keep_working(local):
    http = await local()
    made = await http.post("/admin/keys", content=KEY)  # curl -d: no Origin, a form type
    assert made.status_code == 201, made.text
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080"):
        same = {"Host": host, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}
        assert (await http.get("/admin/keys", headers=same)).status_code == 200, host
    assert (await http.get("/console", headers={"Host": "127.0.0.1:8080"})).status_code == 200


async def test_allowed_origins_and_hosts_are_settings(local):
    http = await local(allowed_origins=["http://app.example"], allowed_hosts=["gw.internal"])
    r = await http.post(
        "/admin/keys",
        content=KEY,
        headers={"Host": "gw.internal", "Origin": "http://app.example", "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    r = await http.options(
        "/admin/keys",
        headers={
            "Host": "gw.internal",
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
        },
    )
    assert r.status_code == 200  # the preflight an allowed origin's JSON POST sends
    r = await http.get("/admin/keys", headers={"Host": "gw.internal", "Origin": "http://other.example"})
    assert r.status_code == 403
    assert (await http.get("/admin/keys", headers={"Host": "localhost:8080"})).status_code == 400


async def test_a_gateway_on_every_interface_takes_any_host_but_not_foreign_pages(local):
    http = await local(host="0.0.0.0", auth_enabled=True)
    r = await http.get("/api/v1/health/live", headers={"Host": "gateway.svc.cluster.local"})
    assert r.status_code == 200
    r = await http.post(
        "/v1/chat/completions",
        content=b"{}",
        headers={"Host": "gateway.svc.cluster.local", "Origin": "http://evil.example"},
    )
    assert r.status_code == 403
