from cyllm.protocol.breaker import CircuitBreakers
from tests.clock import ManualClock


def test_a_circuit_opens_after_threshold_failures_in_a_row():
    clock = ManualClock(100.0)
    b = CircuitBreakers(threshold=3, cooldown_s=10, clock=clock)
    b.failed("w1")
    b.failed("w1")
    b.succeeded("w1")  # a success in between: the count starts again
    b.failed("w1")
    b.failed("w1")
    assert not b.is_open("w1")
    b.failed("w1")
    assert b.is_open("w1") and b.open_peers() == {"w1"}
    assert not b.is_open("w2")


def test_after_the_cooldown_one_failure_reopens_and_one_success_closes():
    clock = ManualClock(100.0)
    b = CircuitBreakers(threshold=2, cooldown_s=10, clock=clock)
    b.failed("w1")
    b.failed("w1")
    clock.now += 10.5
    assert not b.is_open("w1")  # half-open: let a call through
    b.failed("w1")
    assert b.is_open("w1")  # that call failed: open again, for a whole cooldown
    clock.now += 9
    assert b.is_open("w1")
    clock.now += 2
    b.succeeded("w1")
    assert not b.is_open("w1") and b.open_peers() == set()
    b.failed("w1")
    assert not b.is_open("w1")  # closed again: one failure is not enough
