"""Which datasets a training job may read, and reading them safely.

A job names its data either as an uploaded file (by id; the tenant's own) or as a path.
A path is accepted only under one of ``coordinator.datasets_dirs`` (resolved, symlinks
included, before the check); an admin may name any path only when
``datasets_any_path_for_admins`` is on.  Every refusal is the same sentence, which
neither quotes the path nor says whether it exists: the coordinator's disk is not an
oracle.  An accepted dataset is read once here, in a child process under a memory and
time limit (``training/check.py``), so a bad one is refused now with a 400 rather than
failing later on a worker, and a malicious one cannot take the coordinator down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cyllm import errors
from cyllm.protocol.tenant import Tenant
from cyllm.training.check import check_dataset
from cyllm.training.data import Limits
from cyllm.training.spec import TrainingSpec

REFUSED = (
    "dataset must be an uploaded file (training_file, or fileId) or a path under the server's datasets_dirs"
)


@dataclass(frozen=True)
class DatasetPolicy:
    roots: tuple[Path, ...] = ()
    admin_any_path: bool = False
    limits: Limits = Limits()
    memory_bytes: int = 1 << 30
    timeout_s: float = 120.0

    def resolve(self, given: str, tenant: Tenant, param: str = "dataset") -> Path:
        """The dataset's real path, or InvalidRequest(REFUSED)."""
        roots = [r.resolve() for r in self.roots]
        candidates = [Path(given)] if Path(given).is_absolute() else [r / given for r in roots]
        for candidate in candidates:
            try:
                path = candidate.resolve()
            except (OSError, RuntimeError):  # a symlink loop, a name too long
                continue
            inside = any(path == r or r in path.parents for r in roots)
            if (inside or (tenant.admin and self.admin_any_path)) and path.exists():
                return path
        raise errors.InvalidRequest(REFUSED.replace("dataset", param, 1), param=param)

    async def check(self, path: Path | str, spec: TrainingSpec | None = None) -> int:
        """How many examples it has, or DatasetError saying what is wrong."""
        return await check_dataset(
            str(path),
            spec.dataset_format if spec else None,
            spec.prompt_column if spec else None,
            spec.response_column if spec else None,
            self.limits,
            memory_bytes=self.memory_bytes,
            timeout_s=self.timeout_s,
            objective=spec.objective if spec else None,
        )
