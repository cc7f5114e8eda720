"""A training dataset from the Hub (``hf://org/name``), through a local stand-in of the
Hub's file API: fetched once into the server's folder in the dataset checker's child
process, with the real ``huggingface_hub`` and ``datasets``, under the upload limits, and
only for the tenants the server allows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cyllm import errors
from cyllm.coordinator.datasets import DatasetPolicy
from cyllm.protocol.tenant import Tenant
from cyllm.training.data import DatasetError, Limits
from cyllm.training.spec import TrainingSpec
from tests.conftest import free_port
from tests.fakes.hub import SHA, Hub

DATA = Path(__file__).parents[1] / "data"
ALICE, BOB, ADMIN = Tenant("alice"), Tenant("bob"), Tenant("root", admin=True)
CARD = """---
configs:
- config_name: facts
  data_files:
  - split: train
    path: facts/train.jsonl
  - split: validation
    path: facts/validation.jsonl
---
# Made-up facts
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    facts = root / "facts"
    (facts / "facts").mkdir(parents=True)
    shutil.copy(DATA / "facts.jsonl", facts / "facts" / "train.jsonl")
    shutil.copy(DATA / "facts_held_out.jsonl", facts / "facts" / "validation.jsonl")
    (facts / "README.md").write_text(CARD)
    (facts / "loader.py").write_text("raise SystemExit('a loading script is never fetched')\n")
    big = root / "big"
    big.mkdir()
    (big / "train.jsonl").write_text((DATA / "facts.jsonl").read_text() * 40)
    with Hub({"datasets/acme/facts": facts, "datasets/acme/big": big}, free_port()) as server:
        yield server


@pytest.fixture
def policy(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return DatasetPolicy(hub_dir=tmp_path / "hub-datasets", hub_allowed=("admins", "alice"))


def _spec(**fields) -> TrainingSpec:
    return TrainingSpec.parse(
        {"base_model": "m", "dataset": "hf://acme/facts", "dataset_config": "facts", **fields}
    )


async def test_a_hub_dataset_is_fetched_once_and_read_as_the_job_reads_it(hub, policy):
    spec = _spec(validation_dataset="hf://acme/facts")
    path = Path(await policy.admit(spec, "dataset", ALICE, uploaded=False))
    assert path.is_relative_to(policy.hub_dir) and path.name == SHA  # pinned to the commit
    assert (path / "facts" / "train.jsonl").exists() and not (path / "loader.py").exists()
    assert "loader.py" not in hub.downloads
    rows = len((DATA / "facts.jsonl").read_text().splitlines())
    assert (await policy.check(path, spec)).examples == rows
    # the validation dataset is the same repository: its validation split
    held_out = len((DATA / "facts_held_out.jsonl").read_text().splitlines())
    spec.validation_split = spec.split_of("validation_dataset")
    assert spec.validation_split == "validation"
    assert Path(await policy.admit(spec, "validation_dataset", ALICE, uploaded=False)) == path
    assert (await policy.check(path, spec, "validation_dataset")).examples == held_out
    fetched = len(hub.downloads)
    await policy.admit(spec, "dataset", ADMIN, uploaded=False)
    assert len(hub.downloads) == fetched  # cached: nothing downloaded again


async def test_only_the_tenants_the_server_allows_may_read_the_hub(policy):
    with pytest.raises(errors.Forbidden, match="does not let you train on Hub datasets"):
        await policy.admit(_spec(), "dataset", BOB, uploaded=False)
    closed = DatasetPolicy(hub_dir=None)
    with pytest.raises(errors.Forbidden):
        await closed.admit(_spec(), "dataset", ADMIN, uploaded=False)


async def test_a_hub_dataset_is_held_to_the_upload_limits(hub, policy, tmp_path):
    small = DatasetPolicy(
        hub_dir=tmp_path / "small", hub_allowed=("everyone",), limits=Limits(max_bytes=20_000)
    )
    with pytest.raises(DatasetError, match="acme/big.*bytes of data files, over the 20000 byte limit"):
        await small.admit(_spec(dataset="hf://acme/big", dataset_config=None), "dataset", BOB, uploaded=False)
    assert not any(d.endswith("train.jsonl") and "big" in d for d in hub.downloads)
    few = DatasetPolicy(hub_dir=tmp_path / "few", hub_allowed=("everyone",), limits=Limits(max_rows=5))
    with pytest.raises(DatasetError, match="more than 5 records"):
        await few.admit(_spec(), "dataset", BOB, uploaded=False)


async def test_a_missing_dataset_revision_or_split_is_a_clear_refusal(policy):
    for spec, why in [
        (_spec(dataset="hf://acme/nothing"), "'acme/nothing' was not found"),
        (_spec(dataset_revision="v9"), "no such revision"),
        (_spec(dataset_split="test"), "no split 'test'"),
        (_spec(dataset_config="other"), "hf://acme/facts: no config 'other' \\(configs: facts\\)"),
    ]:
        with pytest.raises(DatasetError, match=why):
            await policy.admit(spec, "dataset", ALICE, uploaded=False)


def test_a_hub_id_is_checked_where_the_spec_is():
    for bad in ("hf://acme", "hf://../etc/passwd", "hf://acme/facts/extra", "hf://-x/y"):
        with pytest.raises(errors.InvalidRequest, match="a Hub dataset is 'hf://org/name'"):
            _spec(dataset=bad)
    with pytest.raises(errors.InvalidRequest, match="dataset_revision"):
        _spec(dataset_revision="../x")
    assert json.loads(_spec().model_dump_json())["dataset_split"] == "train"


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../../../../etc/hostname",
        "http://169.254.169.254/latest/meta-data",
        "hf://datasets/acme/facts",
    ],
)
async def test_a_card_that_names_files_outside_the_dataset_is_refused(tmp_path, monkeypatch, path):
    """A dataset's card is its author's: its configs may only name files inside it."""
    repo = tmp_path / "hostile"
    repo.mkdir()
    shutil.copy(DATA / "facts.jsonl", repo / "train.jsonl")
    (repo / "README.md").write_text(
        f"---\nconfigs:\n- config_name: x\n  data_files:\n  - split: train\n    path: {path}\n---\n"
    )
    (repo / "state.json").write_text('{"_data_files": [{"filename": "/etc/passwd"}]}')  # never fetched
    with Hub({"datasets/evil/card": repo}, free_port()) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        policy = DatasetPolicy(hub_dir=tmp_path / "hub-datasets", hub_allowed=("everyone",))
        spec = _spec(dataset="hf://evil/card", dataset_config="x")
        with pytest.raises(DatasetError, match="outside the dataset"):
            await policy.admit(spec, "dataset", BOB, uploaded=False)
        assert "state.json" not in hub.downloads


def test_a_folder_without_a_card_takes_its_splits_from_file_names(tmp_path):
    from cyllm.training.data import Reading, load_examples

    (tmp_path / "data").mkdir()
    shutil.copy(DATA / "facts.jsonl", tmp_path / "data" / "train-00000-of-00001.jsonl")
    shutil.copy(DATA / "facts_held_out.jsonl", tmp_path / "data" / "validation-00000-of-00001.jsonl")
    facts = len((DATA / "facts.jsonl").read_text().splitlines())
    assert len(load_examples(tmp_path, Reading("hf"))) == facts
    assert len(load_examples(tmp_path, Reading("hf", split="validation"))) == 2
    with pytest.raises(DatasetError, match="no split 'test' \\(splits: train, validation\\)"):
        load_examples(tmp_path, Reading("hf", split="test"))
