"""Which datasets a training job may read, and reading them safely.

A job names its data as an uploaded file (by id; the tenant's own), as a path, or as a
Hub dataset (``hf://org/name``; fetched into ``hub_dir``, and only by the tenants
``hub_allowed`` names: "admins", "everyone", or tenant ids).
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
from cyllm.training.check import Checked, Hub, check_dataset
from cyllm.training.data import Limits, Reading
from cyllm.training.spec import HUB, TrainingSpec

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
    formatters: tuple[str, ...] = ()  # a deployment's (formats.configured)
    hub_dir: Path | None = None  # None: no Hub datasets
    hub_allowed: tuple[str, ...] = ("admins",)

    def may_fetch(self, tenant: Tenant) -> bool:
        allowed = self.hub_allowed
        return "everyone" in allowed or tenant.subject in allowed or (tenant.admin and "admins" in allowed)

    async def admit(self, spec: TrainingSpec, field: str, tenant: Tenant, uploaded: bool) -> str:
        """The local path the job reads for ``field`` (a path resolved, a Hub dataset
        fetched), once it was read as the job will read it; or InvalidRequest."""
        given = getattr(spec, field)
        hub = None
        if given.startswith(HUB):
            if self.hub_dir is None or not self.may_fetch(tenant):
                raise errors.Forbidden(
                    f"{field}: this server does not let you train on Hub datasets "
                    "(coordinator.hub_datasets_allowed)",
                    param=field,
                )
            hub = Hub(given.removeprefix(HUB), spec.dataset_revision, str(self.hub_dir))
        elif not uploaded:
            given = str(self.resolve(given, tenant, field))
        return (await self.check(given, spec, field, hub)).path

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

    async def check(
        self,
        path: Path | str,
        spec: TrainingSpec | None = None,
        field: str = "dataset",
        hub: Hub | None = None,
    ) -> Checked:
        """How many examples it has, or DatasetError saying what is wrong."""
        return await check_dataset(
            str(path),
            Reading.of(spec, field, self.formatters) if spec else Reading(formatters=self.formatters),
            self.limits,
            memory_bytes=self.memory_bytes,
            timeout_s=self.timeout_s,
            objective=spec.objective if spec else None,
            hub=hub,
        )
