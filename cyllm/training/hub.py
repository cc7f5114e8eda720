"""A dataset from the Hugging Face Hub (``hf://org/name``), fetched once into the
server's Hub datasets folder and then read like any local ``hf`` folder.

The Hub is reached through ``huggingface_hub`` as everywhere else (``HF_ENDPOINT`` names
a mirror or a private Hub, ``HF_TOKEN`` a token for private datasets).  Before anything
is downloaded the repository's file list is read and its data files are counted against
the same byte limit as an upload: a tenant may name any public dataset, and some are
terabytes.  Only data files and the card (whose ``configs`` name the subsets) are
fetched — never a loading script — and the files are read by the dataset readers
(``data.py``), which take the card's ``configs`` only as patterns inside the fetched
folder (a card naming ``/etc/passwd``, ``../..`` or a URL is refused).  The download
is pinned to the commit the file list came from, and kept in Hugging Face's cache
layout: a second job on the same revision downloads nothing.  This runs in the dataset
checker's child process (``check.py``), under its memory and time limit.
"""

from __future__ import annotations

from pathlib import Path

from cyllm.training.data import Limits
from cyllm.training.records import DatasetError

# Data files and the card (its configs name each subset's files); never a loading
# script, nor save_to_disk's metadata (which would make it read as a saved folder).
DATA_FILES = ["*.json", "*.jsonl", "*.csv", "*.tsv", "*.parquet", "README.md"]
METADATA = {"dataset_info.json", "dataset_dict.json", "state.json"}


def fetch(repo: str, revision: str | None, cache_dir: Path, limits: Limits) -> tuple[Path, bool]:
    """The local folder of ``repo``'s data files at ``revision`` and whether this call
    downloaded it (False: it was cached), or DatasetError."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        filter_repo_objects,
    )

    where = f"Hub dataset {repo!r}" + (f" at {revision!r}" if revision else "")
    try:
        info = HfApi().dataset_info(repo, revision=revision, files_metadata=True, timeout=30)
        siblings = info.siblings or []
        files = [
            f
            for f in filter_repo_objects(siblings, allow_patterns=DATA_FILES, key=lambda s: s.rfilename)
            if f.rfilename.rsplit("/", 1)[-1] not in METADATA
        ]
        if not any(f.rfilename != "README.md" for f in files):
            raise DatasetError(f"{where}: no data files (JSON, JSONL, CSV or Parquet)")
        total = sum(f.size or 0 for f in files)
        if total > limits.max_bytes:
            raise DatasetError(
                f"{where}: {total} bytes of data files, over the {limits.max_bytes} byte limit"
            )

        def download(local_only: bool) -> str:
            return snapshot_download(
                repo,
                repo_type="dataset",
                revision=info.sha,
                cache_dir=cache_dir,
                allow_patterns=[f.rfilename for f in files],
                local_files_only=local_only,
            )

        try:  # already here (another job's): kept even if this job's reading fails
            folder, fresh = download(True), False
        except Exception:
            folder, fresh = download(False), True
    except (RepositoryNotFoundError, GatedRepoError):
        raise DatasetError(f"{where} was not found, or this server may not read it") from None
    except RevisionNotFoundError:
        raise DatasetError(f"{where}: no such revision") from None
    except HfHubHTTPError as exc:
        raise DatasetError(f"{where}: the Hub answered {str(exc).splitlines()[0][:200]}") from None
    except OSError as exc:  # unreachable, or (offline) nothing cached
        raise DatasetError(f"{where}: the Hub could not be reached ({str(exc)[:200]})") from None
    return Path(folder), fresh


def forget(snapshot: Path, cache_dir: Path) -> None:
    """Remove a revision this job fetched and then refused, through huggingface_hub's own
    cache management (best effort): refused datasets do not pile up in the folder."""
    from huggingface_hub import scan_cache_dir

    try:
        scan_cache_dir(cache_dir).delete_revisions(snapshot.name).execute()
    except Exception:  # gone already, or never complete: nothing to keep
        pass
