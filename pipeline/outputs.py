"""Output folders: samcp writes, replaces or deletes only folders it made itself.

Every folder a samcp command writes (a synthetic dataset, a training run, a prediction folder, an
oracle folder, the demo's folder) carries a small marker file, ``.samcp-output``, naming its kind.
A proposal cache is recognised by its Zarr root attribute ``samcp_cache_version`` instead (external
tools read caches; the marker would be foreign to them).

The one rule, applied by :func:`prepare_output_dir` for every command:

- a path that is a file, or lies under a file, is refused;
- a missing or empty folder is fine;
- an existing folder of the same kind is replaced only with ``overwrite`` (or resumed, where the
  command resumes);
- any other non-empty folder is refused, with or without ``overwrite``.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from samcp.pipeline.errors import SamcpError

MARKER = ".samcp-output"
# A running command's lock file (see samcp.pipeline.precompute); it does not make a folder non-empty.
LOCK_FILE = ".samcp-lock"

# Kinds of output folders and what the user calls them in messages.
KINDS = {
    "cache": "proposal cache",
    "dataset": "synthetic dataset",
    "run": "training run",
    "predictions": "prediction folder",
    "oracle": "oracle prediction folder",
    "demo": "demo folder",
}


def check_out_path(path: str | Path, option: str = "--out") -> Path:
    """Refuses a path that is a file or lies under a file; returns it as a Path.

    Raises:
        SamcpError: ``path`` (or one of its parents) is an existing file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SamcpError(f"{option} {path} is a file; pass a folder path instead")
    _check_parents(path, option)
    return path


def check_out_file(path: str | Path, option: str) -> Path:
    """Refuses a file destination that is a folder or lies under a file; returns it as a Path."""
    path = Path(path)
    if path.is_dir():
        raise SamcpError(f"{option} {path} is a folder; pass a file path")
    _check_parents(path, option)
    return path


def _check_parents(path: Path, option: str) -> None:
    """Refuses a path whose nearest existing parent is a file (it could never be created)."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise SamcpError(
                    f"{option} {path} lies under the file {parent}; pass a path in a folder"
                )
            return


def output_kind(path: str | Path) -> str | None:
    """The kind of samcp output at ``path`` (a key of KINDS), or None if samcp did not make it."""
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            return None
        return kind if kind in KINDS else None
    if _is_cache(path):
        return "cache"
    return None


# What the kinds that are replaced whole consist of. Replacing such a folder that holds anything
# else (notes, a cache put inside a dataset) is refused, so that nothing of the user's goes with it.
REPLACED_ENTRIES: dict[str, frozenset[str]] = {
    "dataset": frozenset(
        {"annotations", "train2017", "val2017", "semantic_train2017", "semantic_val2017",
         "classes.txt", "classes_seen.txt", MARKER}
    ),
    "predictions": frozenset(
        {"panoptic", "semantic", "panoptic.json", "instances.json", "predict_info.json", MARKER}
    ),
    "oracle": frozenset({"panoptic", "semantic", "panoptic.json", "instances.json", MARKER}),
}


def _is_cache(path: Path) -> bool:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "samcp_cache_version" in (meta.get("attributes") or {})


def is_empty_dir(path: Path) -> bool:
    """True for a folder that holds nothing but (possibly) samcp's lock file or its leftovers."""
    return path.is_dir() and all(p.name.startswith(LOCK_FILE) for p in path.iterdir())


def prepare_output_dir(
    path: str | Path, kind: str, *, overwrite: bool = False, reuse: bool = False,
    option: str = "--out",
) -> bool:
    """Checks that samcp may write a ``kind`` folder at ``path``; creates nothing.

    Args:
        path: the destination folder.
        kind: a key of KINDS.
        overwrite: the user asked to replace an existing folder of this kind.
        reuse: the command itself continues an existing folder of this kind (resume, a rerun
            that replaces predictions); it is then accepted without ``overwrite``.
        option: the option's name, for messages.

    Returns:
        True if a samcp folder of this kind is already there (to resume or replace).

    Raises:
        SamcpError: the path is a file, lies under a file, holds something samcp did not make
            (or another kind of samcp output), or holds this kind without ``overwrite``/``reuse``.
    """
    path = check_out_path(path, option)
    if not path.exists() or is_empty_dir(path):
        return False
    found = output_kind(path)
    what = KINDS[kind]
    if found is None:
        raise SamcpError(
            f"{option} {path} is a non-empty folder that samcp did not make; samcp never writes "
            f"into or deletes such a folder (--overwrite included): choose a new or empty folder "
            f"for the {what}"
        )
    if found != kind:
        raise SamcpError(
            f"{option} {path} holds a samcp {KINDS[found]}, not a {what}; choose another folder"
        )
    if not (overwrite or reuse):
        raise SamcpError(
            f"{option} {path} already holds a {what}; pass --overwrite to replace it, "
            "or choose another folder"
        )
    if kind in REPLACED_ENTRIES:
        foreign = sorted(
            p.name for p in path.iterdir()
            if p.name not in REPLACED_ENTRIES[kind] and not p.name.startswith(LOCK_FILE)
        )
        if foreign:
            raise SamcpError(
                f"{option} {path} holds a {what} and also {', '.join(foreign[:5])}, which samcp "
                "did not write; replacing the folder would delete them: move them out or choose "
                "another folder"
            )
    return True


def staging_path(out_dir: str | Path, what: str) -> Path:
    """A hidden path beside ``out_dir`` that does not exist yet (``.NAME.WHAT-PID-RANDOM``).

    Outputs are built there and renamed into place; the name is new each time, so two runs never
    share (or delete) each other's staging folder.
    """
    out_dir = Path(out_dir).absolute()
    while True:
        path = out_dir.with_name(f".{out_dir.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")
        if not path.exists():
            return path


def write_marker(folder: str | Path, kind: str) -> None:
    """Marks ``folder`` as a samcp output of ``kind`` (call it in the staging folder, before the
    rename that publishes it)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    folder = Path(folder)
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"kind": kind}) + "\n")
    os.replace(tmp, folder / MARKER)
