"""What a training process may name as its result, what a worker may delete, and how
much LoRA rank a vLLM base restarted for an adapter makes room for: every path a script
or a coordinator hands over is confined before it is served, exported or removed."""

from __future__ import annotations

import json

from cyllm.worker.models import _artefact_folder, _lora_rank
from cyllm.worker.training.jobs import _confined


def test_a_result_or_checkpoint_outside_the_job_folder_is_ignored(tmp_path):
    out = tmp_path / "jobs" / "ftjob-1"
    (out / "adapter").mkdir(parents=True)
    kept = _confined({"event": "result", "kind": "adapter", "path": str(out / "adapter")}, out)
    assert kept["path"] == str((out / "adapter").resolve())
    relative = _confined({"event": "checkpoint", "step": 2, "path": "checkpoint-2"}, out)
    assert relative["path"] == str((out / "checkpoint-2").resolve())
    for path in ("/etc", str(tmp_path / "jobs"), str(out), "..", "../ftjob-2/adapter", ""):
        ignored = _confined({"event": "result", "kind": "adapter", "path": path}, out)
        assert ignored["event"] == "log" and "outside the job's folder" in ignored["message"], path
    assert _confined({"event": "progress", "step": 1}, out) == {"event": "progress", "step": 1}


def test_a_worker_deletes_only_an_artefact_in_a_job_folder(tmp_path):
    root = tmp_path / "training"
    (root / "ftjob-1" / "adapter").mkdir(parents=True)
    assert _artefact_folder(root, root / "ftjob-1" / "adapter") == (root / "ftjob-1" / "adapter").resolve()
    for path in (root, root / "ftjob-1", tmp_path, root / "ftjob-1" / "missing", root / ".." / "x"):
        assert _artefact_folder(root, path) is None, path


def test_a_restart_for_an_adapter_makes_room_for_its_rank(tmp_path):
    def adapter(r) -> object:
        folder = tmp_path / f"r{r}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": r}))
        return folder

    assert _lora_rank(adapter(8)) == 8
    assert _lora_rank(adapter(16)) == 16
    assert _lora_rank(adapter(24)) == 32
    assert _lora_rank(adapter(512)) == 512
    assert _lora_rank(adapter(1024)) is None  # no vLLM slot holds it: served another way
    assert _lora_rank(None) == 16 and _lora_rank(tmp_path / "absent") == 16
