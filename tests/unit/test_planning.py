import pytest

from cyllm import errors
from cyllm.worker.engines.planning import SamplingDefaults, plan_max_tokens
from cyllm.worker.engines.types import SamplingParams
from cyllm.worker.settings import ModelSpec


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


def test_negative_max_tokens_is_refused_and_zero_scores_a_prompt():
    with pytest.raises(errors.InvalidRequest, match="must not be negative"):
        plan_max_tokens(10, -1, context=100, default=16)
    assert plan_max_tokens(10, 0, context=100, default=16) == 0  # the engine asks for prompt logprobs


def test_unset_sampling_takes_the_defaults():
    defaults = SamplingDefaults(temperature=0.0, top_p=0.9)
    got = defaults.apply(SamplingParams())
    assert (got.temperature, got.top_p) == (0.0, 0.9)
    assert defaults.apply(SamplingParams(temperature=0.7)).temperature == 0.7


def spec(**kw) -> ModelSpec:
    return ModelSpec(id="m", engine="fake", **kw)


def test_defaults_come_from_the_spec_then_the_model_then_one():
    assert SamplingDefaults.of(spec()) == SamplingDefaults(1.0, 1.0)
    assert SamplingDefaults.of(spec(), {"temperature": 0.6, "top_p": None}) == SamplingDefaults(0.6, 1.0)
    assert SamplingDefaults.of(spec(top_p=0.5), {"temperature": 0.6, "top_p": 0.9}) == SamplingDefaults(
        0.6, 0.5
    )


def test_a_configured_greedy_default_stays_greedy():
    # 0.0 is a value, not "unset": it must not fall through to the model's or to 1.0.
    assert SamplingDefaults.of(spec(temperature=0.0), {"temperature": 0.7}).temperature == 0.0


@pytest.mark.parametrize("params", [SamplingParams(temperature=-1), SamplingParams(top_p=0)])
def test_out_of_range_sampling_is_refused(params):
    with pytest.raises(errors.InvalidRequest):
        SamplingDefaults().apply(params)
