"""Whether a result beat its base, each score read in the direction it improves."""

from __future__ import annotations

from cyllm.training.verdict import compare, verdict
from cyllm.worker.training.harness import scores_of


def test_a_lower_loss_and_a_higher_accuracy_are_better():
    scores = {
        "base.eval_loss": 2.0,
        "result.eval_loss": 0.5,
        "base.facts.acc": 0.25,
        "result.facts.acc": 1.0,
        "incumbent.eval_loss": 1.0,  # the alias's target: not the base
    }
    assert [(c.metric, c.better) for c in compare(scores)] == [("eval_loss", True), ("facts.acc", True)]
    assert verdict(scores) == "the result is better than the base: eval_loss 0.5 vs 2, facts.acc 1 vs 0.25"


def test_a_result_worse_than_its_base_is_said_to_be():
    assert verdict(
        {"base.eval_loss": 1.5, "result.eval_loss": 7.25, "base.perplexity": 4.5, "result.perplexity": 1408}
    ) == ("the result is worse than the base: eval_loss 7.25 vs 1.5, perplexity 1408 vs 4.5")
    mixed = {
        "base.eval_loss": 1.0,
        "result.eval_loss": 2.0,
        "base.wiki.word_perplexity": 30,
        "result.wiki.word_perplexity": 20,
    }
    assert verdict(mixed) == (
        "the result is better than the base on wiki.word_perplexity 20 vs 30; worse on eval_loss 2 vs 1"
    )
    assert verdict({"base.eval_loss": 1.0, "result.eval_loss": 1.0}) == "the result scores as the base does"
    assert verdict({"result.eval_loss": 1.0}) == ""  # nothing to compare with


def test_the_harness_results_become_flat_scores():
    results = {
        "facts": {"alias": "facts", "acc,none": 0.75, "acc_stderr,none": "N/A", "sample_len": 4},
        "gsm": {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 0.6, "bypass,none": True},
    }
    assert scores_of(results) == {
        "facts.acc": 0.75,
        "gsm.exact_match.strict-match": 0.5,
        "gsm.exact_match.flexible-extract": 0.6,
    }
