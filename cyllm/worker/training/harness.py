"""A job's lm-evaluation-harness tasks (``eval_tasks``), run as a library on the base
before training and on the result after it, their scores stored beside the validation
loss (``base.<task>.<metric>``, ``result.<task>.<metric>``).

Which tasks a job may name is the worker's to say: the task files in
``worker.eval_tasks_dir`` (YAML in the harness's own format, reading local data files —
no network), and the harness's bundled tasks only where ``worker.eval_builtin_tasks`` is
on (they fetch their datasets from the Hub, and some are hours long).  A task file is
the operator's code (the harness runs its ``!function`` hooks); a tenant only names one.
Tasks that run model-written code are never confirmed.
"""

from __future__ import annotations

from typing import Any

from cyllm import errors


def task_manager(tasks_dir: str | None, builtin: bool) -> Any:
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise errors.InvalidRequest(
            "eval_tasks: lm-evaluation-harness is not installed on this worker (pip install 'cyllm[train]')",
            param="eval_tasks",
        ) from None

    return TaskManager(include_path=tasks_dir or None, include_defaults=builtin, verbosity="ERROR")


def check_tasks(tasks: list[str], manager: Any) -> None:
    """InvalidRequest naming the tasks this worker does not have (before any training)."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        known = sorted(manager.all_tasks)
        listed = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        raise errors.InvalidRequest(
            f"eval_tasks: {', '.join(unknown)} not among this worker's evaluation tasks ({listed or 'none'})",
            param="eval_tasks",
        )


def run_tasks(
    tasks: list[str],
    manager: Any,
    model_path: str,
    adapter: str | None,
    device: str,
    limit: int | None,
    seed: int,
    batch_size: int,
) -> dict[str, float]:
    """``<task>.<metric>`` of the model at ``model_path`` (with ``adapter``, a PEFT folder),
    loaded by the harness itself on ``device``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=model_path, peft=adapter, device=device, dtype="float32", batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=0,  # no standard errors: the scores, not their resampling
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        confirm_run_unsafe_code=False,
    )
    return scores_of(out["results"] if out else {})


def scores_of(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The harness's ``{"task": {"acc,none": 0.5, "acc_stderr,none": ...}}`` as flat scores."""
    scores = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, applied = key.partition(",")
            if "stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            if isinstance(value, bool):
                continue
            name = f"{task}.{metric}" if applied in ("", "none") else f"{task}.{metric}.{applied}"
            scores[name] = float(value)
    return scores
