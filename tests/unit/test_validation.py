import pytest

from cyllm import errors
from cyllm.worker.engines.base import SamplingParams
from cyllm.worker.engines.validation import plan_max_tokens, resolve_sampling


def test_default_max_tokens_is_bounded_by_the_context():
    assert plan_max_tokens(10, None, context=100, default=512) == 90
    assert plan_max_tokens(10, None, context=1000, default=512) == 512


def test_prompt_that_fills_the_context_is_refused_with_the_numbers():
    with pytest.raises(errors.ContextLengthExceeded, match="120 tokens.*100 tokens"):
        plan_max_tokens(120, None, context=100, default=16)


def test_max_tokens_beyond_the_context_is_refused_with_the_numbers():
    with pytest.raises(errors.ContextLengthExceeded, match="requested 110 tokens") as info:
        plan_max_tokens(10, 100, context=100, default=16)
    assert info.value.param == "max_tokens"


def test_max_tokens_below_one_is_refused():
    with pytest.raises(errors.InvalidRequest, match="at least 1"):
        plan_max_tokens(10, 0, context=100, default=16)


def test_unset_sampling_takes_the_model_defaults():
    got = resolve_sampling(SamplingParams(), temperature=0.0, top_p=0.9)
    assert (got.temperature, got.top_p) == (0.0, 0.9)
    got = resolve_sampling(SamplingParams(temperature=0.7), temperature=0.0, top_p=0.9)
    assert got.temperature == 0.7


@pytest.mark.parametrize("params", [SamplingParams(temperature=-1), SamplingParams(top_p=0)])
def test_out_of_range_sampling_is_refused(params):
    with pytest.raises(errors.InvalidRequest):
        resolve_sampling(params, 1.0, 1.0)
