from cyllm.coordinator.cache import CachedResponse, InMemoryPromptCache, cache_key, is_deterministic
from cyllm.gateway.request import GenerationRequest, Message, Sampling
from tests.clock import ManualClock


def build_request(request_id, model, *, prompt=None, messages=None, **sampling):
    """The wire message the gateway sends for such a request."""
    return GenerationRequest(
        model,
        prompt=prompt,
        sampling=Sampling(**sampling),
        messages=[Message(*m) for m in messages] if messages else None,
    ).to_proto(request_id)


ENTRY = CachedResponse(("Paris",), "stop", 5, 1)


def test_key_is_sha256_and_depends_on_model_sampling_and_input():
    base = build_request("r1", "m", prompt="hi", temperature=0)
    key = cache_key(base)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(build_request("other-id", "m", prompt="hi", temperature=0)) == key
    assert cache_key(build_request("r1", "m2", prompt="hi", temperature=0)) != key
    assert cache_key(build_request("r1", "m", prompt="hi!", temperature=0)) != key
    assert cache_key(build_request("r1", "m", prompt="hi", temperature=0, max_tokens=3)) != key
    assert cache_key(build_request("r1", "m", messages=[("user", "hi")], temperature=0)) != key


def test_only_greedy_or_seeded_requests_are_deterministic():
    assert is_deterministic(build_request("r", "m", prompt="x", temperature=0))
    assert is_deterministic(build_request("r", "m", prompt="x", temperature=0.7, seed=1))
    assert not is_deterministic(build_request("r", "m", prompt="x", temperature=0.7))
    assert not is_deterministic(build_request("r", "m", prompt="x"))  # model default unknown


async def test_entries_expire_after_ttl_and_count_hits_and_misses():
    clock = ManualClock()
    cache = InMemoryPromptCache(ttl_s=10, max_entries=8, clock=clock)
    await cache.put("k", ENTRY)
    assert await cache.get("k") == ENTRY
    clock.now = 10.5
    assert await cache.get("k") is None
    assert (await cache.hits(), await cache.misses()) == (1, 1)


async def test_least_recently_used_entry_goes_first_when_full():
    cache = InMemoryPromptCache(ttl_s=60, max_entries=2)
    await cache.put("a", ENTRY)
    await cache.put("b", ENTRY)
    await cache.get("a")
    await cache.put("c", ENTRY)
    assert await cache.get("b") is None
    assert await cache.get("a") == ENTRY and await cache.get("c") == ENTRY
    assert await cache.size() == 2


async def test_zero_ttl_disables_the_cache():
    cache = InMemoryPromptCache(ttl_s=0, max_entries=8)
    await cache.put("a", ENTRY)
    assert await cache.get("a") is None
