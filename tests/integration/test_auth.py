"""Authentication (API keys, JWT), authorisation and rate limits at the gateway."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings
from tests.integration.conftest import fake_model

SECRET = "s3cret-for-tests-only-0123456789abcdef"
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token(sub="alice", scopes="", alg="HS256", key=SECRET, **claims) -> str:
    body = {"sub": sub, "exp": time.time() + 60, "scope": scopes, **claims}
    return jwt.encode(body, key, algorithm=alg, headers=claims.pop("headers", None))


@pytest.fixture
async def secured(make_stack, tmp_path):
    return await make_stack(
        [fake_model(), fake_model("other")],
        gateway={
            "auth_enabled": True,
            "api_keys_file": tmp_path / "keys.json",
            "jwt_secret": SECRET,
            "jwt_issuer": "https://issuer.test",
            "jwt_audience": "cyllm",
        },
    )


ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/fake"),
    ("POST", "/api/v1/inference"),
    ("POST", "/api/v1/inference/stream"),
    ("GET", "/api/v1/models"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("DELETE", "/admin/keys/x"),
    ("PUT", "/admin/keys/x/budget"),
    ("DELETE", "/admin/keys/x/budget"),
    ("GET", "/api/v1/usage"),
    ("GET", "/api/v1/usage/budget"),
    ("POST", "/api/v1/models/fake/load"),
    ("POST", "/api/v1/models/fake/unload"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/x"),
    ("DELETE", "/v1/files/x"),
    ("GET", "/v1/files/x/content"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches"),
    ("GET", "/v1/batches/x"),
    ("POST", "/v1/batches/x/cancel"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/x"),
    ("POST", "/v1/fine_tuning/jobs/x/cancel"),
    ("GET", "/v1/fine_tuning/jobs/x/events"),
    ("GET", "/v1/fine_tuning/jobs/x/checkpoints"),
    ("POST", "/api/v1/training/start"),
    ("GET", "/api/v1/training/status/x"),
    ("GET", "/api/v1/training/jobs"),
    ("POST", "/api/v1/training/cancel/x"),
    ("GET", "/api/v1/training/stream/x"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_x"),
    ("DELETE", "/v1/responses/resp_x"),
    ("GET", "/v1/responses/resp_x/input_items"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/v1/embeddings"),
    ("GET", "/api/v1/training/plot/x"),
    ("GET", "/api/v1/stats"),
    ("DELETE", "/v1/models/fake"),
    ("GET", "/api/v1/models/fake"),
    ("DELETE", "/api/v1/models/fake"),
    ("POST", "/api/v1/models/fake/publish"),
    ("GET", "/api/v1/models/fake/export"),
    ("GET", "/api/v1/aliases"),
    ("PUT", "/api/v1/aliases/x"),
    ("GET", "/api/v1/aliases/x"),
    ("DELETE", "/api/v1/aliases/x"),
    ("POST", "/api/v1/aliases/x/rollback"),
]


async def test_no_route_but_health_and_metrics_answers_without_credentials(secured):
    documented = {(m.upper(), p) for p, ops in secured.app.openapi()["paths"].items() for m in ops}
    open_routes = {
        ("GET", "/api/v1/health"),
        ("GET", "/api/v1/health/live"),
        ("GET", "/metrics"),
        ("GET", "/actuator/prometheus"),
    }
    guarded = {
        (
            m,
            p.replace("{model_id}", "fake")
            .replace("{key_id}", "x")
            .replace("{file_id}", "x")
            .replace("{job_id}", "x")
            .replace("{name}", "x")
            .replace("{response_id}", "resp_x")
            .replace("{batch_id}", "x"),
        )
        for m, p in documented
    } - open_routes
    assert guarded == set(ROUTES)  # a new route must be added here, i.e. thought about
    for method, path in ROUTES:
        resp = await secured.http.request(method, path, json={})
        assert resp.status_code == 401, (method, path, resp.text)
        assert resp.json()["error"]["type"] == "authentication_error"
    assert (await secured.http.get("/api/v1/health")).status_code == 200
    assert (await secured.http.get("/metrics")).status_code == 200


async def test_api_keys_work_are_stored_hashed_and_revocation_is_immediate(secured, tmp_path):
    store = secured.app.state.keys
    key, secret = await store.create("ci")
    assert (
        await secured.http.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
    ).status_code == 200
    on_disk = (tmp_path / "keys.json").read_text()
    assert secret not in on_disk and secret.split("_", 2)[2] not in on_disk  # cy_<id>_<secret>
    assert (tmp_path / "keys.json").stat().st_mode & 0o077 == 0
    wrong = secret[:-2] + ("AA" if not secret.endswith("AA") else "BB")
    assert (await secured.http.get("/v1/models", headers=bearer(wrong))).status_code == 401
    await store.revoke(key.key_id)
    resp = await secured.http.get("/v1/models", headers=bearer(secret))
    assert resp.status_code == 401 and "revoked" in resp.json()["error"]["message"]


async def test_expired_key_and_model_allow_list(secured):
    store = secured.app.state.keys
    _, short = await store.create("short", expires_in_s=0.2)
    await asyncio.sleep(0.3)
    assert (await secured.http.get("/v1/models", headers=bearer(short))).status_code == 401
    _, limited = await store.create("only-fake", models=["fake"])
    ok = await secured.http.post("/v1/chat/completions", json=CHAT, headers=bearer(limited))
    assert ok.status_code == 200
    denied = await secured.http.post(
        "/v1/chat/completions", json={**CHAT, "model": "other"}, headers=bearer(limited)
    )
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    listed = (await secured.http.get("/v1/models", headers=bearer(limited))).json()["data"]
    assert [m["id"] for m in listed] == ["fake"]


async def test_admin_routes_need_the_admin_scope_and_manage_keys(secured):
    _, user = await secured.app.state.keys.create("user")
    _, admin = await secured.app.state.keys.create("root", admin=True)
    assert (await secured.http.get("/admin/keys", headers=bearer(user))).status_code == 403
    for route in ("/api/v1/models/fake/load", "/api/v1/models/fake/unload"):
        refused = await secured.http.post(route, headers=bearer(user))
        assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
    made = await secured.http.post("/admin/keys", json={"name": "new"}, headers=bearer(admin))
    assert made.status_code == 201
    new_key = made.json()["key"]
    assert (await secured.http.get("/v1/models", headers=bearer(new_key))).status_code == 200
    listed = (await secured.http.get("/admin/keys", headers=bearer(admin))).json()["keys"]
    assert {k["name"] for k in listed} == {"user", "root", "new"}
    assert all("secret_sha256" not in k and "key" not in k for k in listed)
    gone = await secured.http.delete(f"/admin/keys/{made.json()['key_id']}", headers=bearer(admin))
    assert gone.json()["revoked"] is True
    assert (await secured.http.get("/v1/models", headers=bearer(new_key))).status_code == 401


# exp/nbf are seconds from when the test runs (not from collection, minutes earlier)
@pytest.mark.parametrize(
    "bad, words",
    [
        (dict(exp=-10), "expired"),
        (dict(nbf=600), "not valid yet"),
        (dict(aud="someone-else"), "audience"),
        (dict(iss="https://evil.test"), "issuer"),
        (dict(key="a-different-secret-of-enough-length-000"), "invalid JWT"),
    ],
)
async def test_bad_jwts_are_refused(secured, bad, words):
    claims = {"aud": "cyllm", "iss": "https://issuer.test", **bad}
    for relative in ("exp", "nbf"):
        if relative in bad:
            claims[relative] = time.time() + bad[relative]
    tok = token(**claims)
    resp = await secured.http.get("/v1/models", headers=bearer(tok))
    assert resp.status_code == 401 and words in resp.json()["error"]["message"]
    good = token(aud="cyllm", iss="https://issuer.test")
    assert (await secured.http.get("/v1/models", headers=bearer(good))).status_code == 200


async def test_jwt_scopes_make_an_admin(secured):
    admin = token(scopes="admin inference", aud="cyllm", iss="https://issuer.test")
    user = token(scopes="inference", aud="cyllm", iss="https://issuer.test")
    assert (await secured.http.get("/admin/keys", headers=bearer(admin))).status_code == 200
    assert (await secured.http.get("/admin/keys", headers=bearer(user))).status_code == 403


async def test_rs256_with_a_public_key_and_with_a_jwks_file(make_stack, tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "pub.pem").write_bytes(pem)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig"}]}))
    for settings in (
        {"jwt_public_key_file": tmp_path / "pub.pem"},
        {"jwt_jwks_file": tmp_path / "jwks.json"},
    ):
        stack = await make_stack(
            gateway={"auth_enabled": True, "api_keys_file": tmp_path / "k.json", **settings}
        )
        signed = jwt.encode(
            {"sub": "bob", "exp": time.time() + 60}, private, algorithm="RS256", headers={"kid": "k1"}
        )
        assert (await stack.http.get("/v1/models", headers=bearer(signed))).status_code == 200
        forged = token(sub="bob")  # HS256: not accepted by an RS256-only gateway
        assert (await stack.http.get("/v1/models", headers=bearer(forged))).status_code == 401


async def test_requests_per_minute_limit_gives_429_with_headers(make_stack, tmp_path):
    stack = await make_stack(
        gateway={"auth_enabled": True, "api_keys_file": tmp_path / "k.json", "rate_limit_rpm": 3}
    )
    _, a = await stack.app.state.keys.create("a")
    _, b = await stack.app.state.keys.create("b")
    codes = [(await stack.http.post("/v1/chat/completions", json=CHAT, headers=bearer(a))) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert codes[0].headers["x-ratelimit-limit-requests"] == "3"
    assert codes[1].headers["x-ratelimit-remaining-requests"] == "1"
    refused = codes[3]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # Limits are per caller: b is untouched.
    assert (await stack.http.post("/v1/chat/completions", json=CHAT, headers=bearer(b))).status_code == 200


async def test_tokens_per_minute_and_concurrency_limits(make_stack, tmp_path):
    slow = fake_model(engine_args={"token_delay_s": 0.05})
    stack = await make_stack(
        [slow],
        gateway={
            "auth_enabled": True,
            "api_keys_file": tmp_path / "k.json",
            "rate_limit_tpm": 30,
            "rate_limit_concurrency": 1,
        },
    )
    _, key = await stack.app.state.keys.create("a")
    body = {"model": "fake", "prompt": "one two", "max_tokens": 10}
    first = asyncio.create_task(stack.http.post("/v1/completions", json=body, headers=bearer(key)))
    await asyncio.sleep(0.15)
    busy = await stack.http.post("/v1/completions", json=body, headers=bearer(key))
    assert busy.status_code == 429 and "at once" in busy.json()["error"]["message"]
    assert (await first).status_code == 200  # 2 + 10 tokens counted
    # 12 counted + 13 reserved (7 characters / 3 + 1, + 10) fits in 30; then 24 + 13 does not
    assert (await stack.http.post("/v1/completions", json=body, headers=bearer(key))).status_code == 200
    over = await stack.http.post("/v1/completions", json=body, headers=bearer(key))
    assert over.status_code == 429 and "tokens per minute" in over.json()["error"]["message"]
    assert over.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_concurrent_requests_cannot_overrun_the_token_limit(make_stack, tmp_path):
    """The attack: rate_limit_tpm 50, 8 concurrent requests of 400 tokens each."""
    slow = fake_model(engine_args={"token_delay_s": 0.01})
    stack = await make_stack(
        [slow], gateway={"auth_enabled": True, "api_keys_file": tmp_path / "k.json", "rate_limit_tpm": 50}
    )
    _, key = await stack.app.state.keys.create("a")
    big = {"model": "fake", "prompt": "hi", "max_tokens": 400}
    refused = await stack.http.post("/v1/completions", json=big, headers=bearer(key))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    # each reserves 1 (prompt) + 16 (completions' default max_tokens): two fit in 50
    body = {"model": "fake", "prompt": "hi"}
    replies = await asyncio.gather(
        *(stack.http.post("/v1/completions", json=body, headers=bearer(key)) for _ in range(8))
    )
    ok = [r for r in replies if r.status_code == 200]
    assert len(ok) == 2 and all(r.status_code == 429 for r in replies if r not in ok)
    assert sum(r.json()["usage"]["total_tokens"] for r in ok) <= 50
    # chat has no default max_tokens: under a token limit it gets tpm_default_reserve,
    # at most the limit, so one request alone cannot use more than the limit either
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    r = await stack.http.post("/v1/chat/completions", json=chat, headers=bearer(key))
    assert r.status_code in (400, 429), r.text


async def test_two_gateways_on_one_redis_enforce_one_limit(make_stack, redis_url):
    stack = await make_stack(gateway={"auth_enabled": True, "redis_url": redis_url, "rate_limit_rpm": 5})
    _, key = await stack.app.state.keys.create("shared")
    other = create_app(
        GatewaySettings(
            coordinators=[f"127.0.0.1:{stack.coordinator.port}"],
            auth_enabled=True,
            redis_url=redis_url,
            rate_limit_rpm=5,
        )
    )
    async with other.router.lifespan_context(other):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=other), base_url="http://127.0.0.1"
        ) as http2:
            codes = []
            for i in range(10):
                client = stack.http if i % 2 else http2
                r = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
                codes.append(r.status_code)
    assert codes.count(200) == 5 and codes.count(429) == 5


def _raw_jwt(header: dict, body: dict) -> str:
    """A token PyJWT would refuse to make (a list as 'alg'), signed like a real one."""
    import base64
    import hashlib
    import hmac

    def part(d: dict) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=")

    signing = part(header) + b"." + part(body)
    sig = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), signing, hashlib.sha256).digest()).rstrip(b"=")
    return (signing + b"." + sig).decode()


@pytest.mark.parametrize(
    "claims",
    [
        {"scopes": {"admin": 1}},
        {"scopes": "admin"},
        {"models": "fake"},
        {"models": [1, 2]},
        {"scope": ["admin"]},
        {"sub": 123},
        {"sub": ["alice"]},
        {"alg": ["HS256"]},
        {"kid": ["x"]},
    ],
    ids=lambda c: json.dumps(c),
)
async def test_jwt_claims_of_the_wrong_type_are_a_401_never_a_500_or_a_grant(secured, claims):
    header = {"typ": "JWT", "alg": claims.pop("alg", "HS256")}
    if "kid" in claims:
        header["kid"] = claims.pop("kid")
    body = {"sub": "alice", "exp": time.time() + 60, "iss": "https://issuer.test", "aud": "cyllm", **claims}
    r = await secured.http.get("/admin/keys", headers=bearer(_raw_jwt(header, body)))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"


async def test_a_jwt_subject_never_spends_an_api_keys_budget(make_stack, tmp_path):
    stack = await make_stack(
        gateway={
            "auth_enabled": True,
            "api_keys_file": tmp_path / "k.json",
            "jwt_secret": SECRET,
            "rate_limit_rpm": 1,
        }
    )
    meta, key = await stack.app.state.keys.create("a")
    forged = jwt.encode({"sub": f"key:{meta.key_id}", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    assert (
        await stack.http.post("/v1/chat/completions", json=CHAT, headers=bearer(forged))
    ).status_code == 200
    assert (await stack.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))).status_code == 200


async def test_credentials_are_checked_before_a_byte_of_the_body_is_read(secured):
    """An ASGI call whose body would be 100 MB: 401 without receive() ever being called."""
    app, reads, sent = secured.app, [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * (1 << 20), "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/files",
        "raw_path": b"/v1/files",
        "query_string": b"",
        "root_path": "",
        "server": ("gw", 80),
        "client": ("127.0.0.1", 1),
        "headers": [
            (b"content-type", b"multipart/form-data; boundary=x"),
            (b"content-length", str(100 << 20).encode()),
        ],
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 401 and reads == []


async def test_admin_routes_have_their_own_rate_limit(make_stack, tmp_path):
    stack = await make_stack(
        gateway={"auth_enabled": True, "api_keys_file": tmp_path / "k.json", "rate_limit_control_rpm": 3}
    )
    _, key = await stack.app.state.keys.create("ops", admin=True)
    codes = [(await stack.http.get("/admin/keys", headers=bearer(key))).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    # generations are counted apart
    assert (await stack.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))).status_code == 200


async def test_a_token_budget_counts_everything_that_becomes_prompt(make_stack, tmp_path):
    """Tools, tool calls and results, system text and response-format schemas are prompt
    too: 16 KB of tool definitions do not pass under a 3,000-token limit as a 2-token
    message would (they used to: the reservation counted message content only)."""
    stack = await make_stack(
        gateway={
            "auth_enabled": True,
            "api_keys_file": tmp_path / "k.json",
            "rate_limit_tpm": 3000,
            "max_body_bytes": 1 << 20,
        }
    )
    _, key = await stack.app.state.keys.create("a")
    tools = [
        {"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 500}} for i in range(32)
    ]
    schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "description": "x" * 500} for i in range(32)},
    }
    for body in (
        {**CHAT, "tools": tools},
        {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}},
        {
            **CHAT,
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": json.dumps({"a": "y" * 16000})},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
        },
    ):
        r = await stack.http.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert r.status_code == 400 and "tokens per minute" in r.json()["error"]["message"], r.text
    assert (await stack.http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))).status_code == 200
