from cyllm.worker.engines.text import IncrementalDecoder, StopMatcher


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
