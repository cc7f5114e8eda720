from cyllm.worker.engines.text import IncrementalDecoder, StopMatcher, Stopper
from cyllm.worker.engines.types import Step


def test_stop_matcher_passes_text_through_without_stops():
    m = StopMatcher([])
    assert m.push("hello") == ("hello", False)


def test_stop_matcher_cuts_at_stop_and_never_emits_it():
    m = StopMatcher(["END"])
    out, hit = m.push("abc E")
    assert (out, hit) == ("abc ", False)  # "E" could start "END": held back
    out, hit = m.push("ND tail")
    assert (out, hit) == ("", True)


def test_stop_matcher_releases_held_text_when_it_cannot_match():
    m = StopMatcher(["END"])
    assert m.push("xE") == ("x", False)
    assert m.push("Nx") == ("ENx", False)
    assert m.flush() == ""


def test_stop_matcher_earliest_of_several_stops_wins():
    m = StopMatcher(["b", "a"])
    assert m.push("xxab") == ("xx", True)


def test_stop_matcher_flush_returns_held_text():
    m = StopMatcher(["###"])
    assert m.push("done ##") == ("done ", False)
    assert m.flush() == "##"


class ByteTokenizer:
    """Each token is one UTF-8 byte; incomplete characters decode to U+FFFD."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_waits_for_complete_multibyte_characters():
    dec = IncrementalDecoder(ByteTokenizer(), list(b"hi "))
    pieces = [dec.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]


class Words:
    """Token i decodes to the i-th word of a fixed text (a decoder for the rule's tests)."""

    def __init__(self, *words: str) -> None:
        self.words = words

    def push(self, token_id: int) -> str:
        return self.words[token_id]

    def flush(self) -> str:
        return ""


def run(stopper: Stopper, tokens: list[int]) -> list[Step]:
    steps = []
    for t in tokens:
        step = stopper.push(t)
        if step is not None:
            steps.append(step)
            if step.finish_reason:
                break
    return steps


def test_stopper_ends_at_max_tokens_with_every_token_counted():
    steps = run(Stopper(Words("a", " b", " c"), (), (), max_new=2), [0, 1, 2])
    assert steps == [Step("a", (0,)), Step(" b", (1,), "length")]


def test_stopper_end_of_sequence_is_counted_not_decoded():
    steps = run(Stopper(Words("a", "<eos>"), {1}, (), max_new=9), [0, 1])
    assert steps == [Step("a", (0,)), Step("", (1,), "stop")]


def test_stopper_cuts_before_a_stop_string_and_carries_held_tokens():
    steps = run(Stopper(Words("x", " E", "N", "D", "y"), (), ["END"], max_new=9), [0, 1, 2, 3, 4])
    # "E" and "N" are held back (they could begin "END"); "N"'s token rides on the end.
    assert steps == [Step("x", (0,)), Step(" ", (1,)), Step("", (2, 3), "stop")]


def test_stopper_releases_held_text_at_an_end_that_is_not_a_stop_string():
    at_length = run(Stopper(Words("x", " E"), (), ["END"], max_new=2), [0, 1])
    assert "".join(s.text for s in at_length) == "x E" and at_length[-1].finish_reason == "length"
    at_eos = run(Stopper(Words("x", " E", "<eos>"), {2}, ["END"], max_new=9), [0, 1, 2])
    assert "".join(s.text for s in at_eos) == "x E" and at_eos[-1].finish_reason == "stop"
