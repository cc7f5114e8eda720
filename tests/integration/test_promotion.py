"""The promotion gate's decisions, on a real registry (the state file): a result moves
its alias only if its loss is lower than the incumbent's and the alias still points
where it did when the incumbent was scored (the end-to-end run, with real training, is
``tests/e2e/test_durable_models.py``)."""

from __future__ import annotations

import pytest

from cyllm import errors
from cyllm.coordinator.registry import ModelRecord, SqliteRegistry
from cyllm.coordinator.sqlite import Database
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import pb
from cyllm.training.spec import TrainingSpec

OWNER = "key:alice"


@pytest.fixture
async def gate(tmp_path):
    db = Database(tmp_path / "state.db")
    await db.start()
    registry = SqliteRegistry(db)
    for n, base in ((1, "base"), (2, "base"), (3, "other")):
        await registry.put(ModelRecord(f"{base}:ft-{n}", OWNER, base, "adapter", f"/jobs/{n}/adapter"))
    manager = TrainingManager(
        None,
        None,
        None,
        None,
        registry,
        "coordinator",
        lease_s=10,
        max_attempts=1,  # type: ignore[arg-type]
    )
    yield manager, registry
    await db.close()


def job(incumbent: str = "", **scores: float) -> pb.TrainingJob:
    return pb.TrainingJob(
        id="ftjob-abc",
        owner=OWNER,
        incumbent=incumbent,
        evaluation={k.replace("_", ".", 1): v for k, v in scores.items()},
    )


def spec(alias: str = "bot") -> TrainingSpec:
    return TrainingSpec(
        base_model="base", dataset="/d.jsonl", validation_dataset="/v.jsonl", promote_to=alias
    )


async def result(registry: SqliteRegistry) -> ModelRecord:
    record = await registry.get("base:ft-2")
    assert record is not None
    return record


async def test_a_new_alias_takes_the_result(gate):
    manager, registry = gate
    said = await manager._promote(job(result_eval_loss=0.9), "bot", await result(registry))
    assert said.startswith("promoted to bot (ftjob-abc: evaluation loss 0.9000)"), said
    assert await registry.alias(OWNER, "bot") == "base:ft-2"


async def test_a_better_result_moves_the_alias_and_a_worse_or_equal_does_not(gate):
    manager, registry = gate
    await registry.move(OWNER, "bot", "base:ft-1", OWNER, "set")
    for loss in (0.5, 0.4):  # equal is not better
        refused = await manager._promote(
            job("base:ft-1", incumbent_eval_loss=0.4, result_eval_loss=loss), "bot", await result(registry)
        )
        assert refused.startswith("not promoted to bot: evaluation loss"), refused
        assert await registry.alias(OWNER, "bot") == "base:ft-1"
    said = await manager._promote(
        job("base:ft-1", incumbent_eval_loss=0.4, result_eval_loss=0.3), "bot", await result(registry)
    )
    assert said == "promoted to bot (ftjob-abc: evaluation loss 0.3000 < 0.4000 of base:ft-1)"
    moves = await registry.moves(OWNER, "bot")
    assert (moves[-1].from_model, moves[-1].to_model, moves[-1].by) == ("base:ft-1", "base:ft-2", OWNER)


async def test_an_alias_moved_during_training_or_an_unscored_result_is_not_promoted(gate):
    manager, registry = gate
    await registry.move(OWNER, "bot", "base:ft-1", OWNER, "set")
    scored = job("base", incumbent_eval_loss=0.9, result_eval_loss=0.1)  # scored against the base
    said = await manager._promote(scored, "bot", await result(registry))
    assert said == "not promoted to bot: it moved to base:ft-1 during training"
    said = await manager._promote(job("base:ft-1", incumbent_eval_loss=0.9), "bot", await result(registry))
    assert said == "not promoted to bot: the result has no evaluation loss"
    assert await registry.alias(OWNER, "bot") == "base:ft-1"


async def test_what_a_job_must_beat_and_what_it_cannot_compare_with(gate):
    manager, registry = gate
    assert await manager._incumbent(OWNER, spec()) is None  # no alias yet
    await registry.move(OWNER, "bot", "base", OWNER, "set")
    assert await manager._incumbent(OWNER, spec()) == {"model": "base", "kind": "base"}
    await registry.move(OWNER, "bot", "base:ft-1", OWNER, "set")
    assert await manager._incumbent(OWNER, spec()) == {
        "model": "base:ft-1",
        "kind": "adapter",
        "path": "/jobs/1/adapter",
    }
    await registry.move(OWNER, "bot", "other:ft-3", OWNER, "set")
    with pytest.raises(errors.InvalidRequest, match="losses of other models do not compare"):
        await manager._incumbent(OWNER, spec())


async def test_a_resumed_run_scores_the_incumbent_once(gate):
    manager, registry = gate
    await registry.move(OWNER, "bot", "base:ft-1", OWNER, "set")
    first = job()
    assert (await manager._incumbent_of(first, spec()))["model"] == "base:ft-1"
    assert first.incumbent == "base:ft-1"
    first.evaluation["incumbent.eval_loss"] = 0.7
    assert await manager._incumbent_of(first, spec()) is None  # scored on the first run
    await registry.move(OWNER, "bot", "base", OWNER, "moved")
    assert (await manager._incumbent_of(first, spec()))["model"] == "base"  # scored again
    assert "incumbent.eval_loss" not in first.evaluation
