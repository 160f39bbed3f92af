"""Episode files, atomic writes and validation on read.

Every file this project writes goes through :func:`atomic_write`: the bytes land in a
temporary file in the same folder, are flushed to disk, and only then renamed over the
final name with ``os.replace`` (atomic on POSIX). A crash - even SIGKILL or a power cut -
therefore leaves either the complete old file, the complete new file, or a stray
``*.tmp`` file that :func:`remove_stale_temporaries` deletes on the next run. A file
with its final name is always complete.

On disk (see DESIGN.md):

* ``rollouts/<episode>.npz`` - ``obs`` uint8 (T, 64, 64, 3), ``action`` float32 (T, 3),
  ``reward`` float32 (T,), ``terminated`` bool (T,), ``truncated`` bool (T,), ``seed``
  int64 (). ``obs[t]`` is the frame the agent saw *before* taking ``action[t]``;
  ``reward[t]``, ``terminated[t]``, ``truncated[t]`` are what the environment returned for
  that action.
* ``series/<episode>.npz`` - ``mu``, ``logvar`` float32 (T, Z), ``action`` float32 (T, 3),
  ``reward`` float32 (T,), ``done`` bool (T,), ``seed`` int64 ().
* Both may hold ``policy`` str (), the policy that drove the episode; files written before
  it was recorded lack it and stay valid (``OPTIONAL_SCHEMA``).

Reading validates keys, dtypes, shapes and lengths and turns every low-level failure
(truncated zip, bad CRC, missing array) into :class:`CorruptFileError` naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
EPISODE_SUFFIX = ".npz"


class CorruptFileError(ValueError):
    """A file exists but cannot be used: truncated, corrupt, or of the wrong layout."""


class MissingDataError(FileNotFoundError):
    """A folder or file that a stage needs does not exist or is empty."""


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write a file atomically: ``write(f)`` fills a temporary file that then replaces ``path``.

    The temporary file lives in the destination folder (so the final ``os.replace`` never
    crosses file systems) and is removed if ``write`` raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the usual permissions so that a
        # data/ volume shared between a container user and the host stays readable.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically replace ``path`` with UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Atomically write ``obj`` as indented JSON (keys sorted, so diffs stay readable)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file, raising :class:`MissingDataError` / :class:`CorruptFileError` with its name."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc})") from exc


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compresslevel: int = 1) -> Path:
    """Atomically save ``arrays`` as a deflate-compressed ``.npz`` readable by ``np.load``.

    ``np.savez_compressed`` always uses zlib level 6; level 1 is about 3x faster on
    CarRacing frames for files only ~10% larger, which keeps saving far cheaper than
    simulating (see benchmarks/bench_generate.py).
    """

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
            for name, value in arrays.items():
                with zf.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    return atomic_write(path, write)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete ``*.tmp`` files left by a killed writer; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


# --------------------------------------------------------------------------- episode files

# name -> (dtype, shape); None in a shape is the time axis T (or any size for the latent axis).
ROLLOUT_SCHEMA: dict[str, tuple[np.dtype, tuple]] = {
    "obs": (np.dtype(np.uint8), ("T", 64, 64, 3)),
    "action": (np.dtype(np.float32), ("T", 3)),
    "reward": (np.dtype(np.float32), ("T",)),
    "terminated": (np.dtype(np.bool_), ("T",)),
    "truncated": (np.dtype(np.bool_), ("T",)),
    "seed": (np.dtype(np.int64), ()),
}
SERIES_SCHEMA: dict[str, tuple[np.dtype, tuple]] = {
    "mu": (np.dtype(np.float32), ("T", "Z")),
    "logvar": (np.dtype(np.float32), ("T", "Z")),
    "action": (np.dtype(np.float32), ("T", 3)),
    "reward": (np.dtype(np.float32), ("T",)),
    "done": (np.dtype(np.bool_), ("T",)),
    "seed": (np.dtype(np.int64), ()),
}
SCHEMAS = {"rollout": ROLLOUT_SCHEMA, "series": SERIES_SCHEMA}
# Arrays a file of either kind may hold. Files written before they existed stay valid: a
# missing optional array is simply left out of what :func:`load_episode` returns. ``policy``
# names the policy that drove the episode (``worldmodels.policies``), a 0-d unicode string.
OPTIONAL_SCHEMA: dict[str, tuple[np.dtype, tuple]] = {
    "policy": (np.dtype(np.str_), ()),
}


def episode_name(index: int) -> str:
    """File name of episode ``index``: zero-padded so that sorting by name is sorting by index."""
    return f"episode_{index:06d}{EPISODE_SUFFIX}"


def episode_index(path: str | os.PathLike) -> int | None:
    """Inverse of :func:`episode_name`; ``None`` for a file that is not an episode."""
    stem = Path(path).name
    if not (stem.startswith("episode_") and stem.endswith(EPISODE_SUFFIX)):
        return None
    digits = stem[len("episode_"):-len(EPISODE_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def list_episodes(folder: str | os.PathLike, what: str = "episodes", hint: str = "") -> list[Path]:
    """Sorted episode files in ``folder``; a missing or empty folder is a :class:`MissingDataError`.

    ``hint`` tells the user which command makes the missing files.
    """
    folder = Path(folder)
    suffix = f" {hint}" if hint else ""
    if not folder.is_dir():
        raise MissingDataError(f"no {what} folder at {folder}.{suffix}")
    paths = sorted(p for p in folder.iterdir() if episode_index(p) is not None)
    if not paths:
        raise MissingDataError(f"{folder} holds no {what} (episode_*.npz).{suffix}")
    return paths


def _check_schema_shape(path, name, dtype, shape, schema, sizes):
    want_dtype, want_shape = schema[name]
    # A string dtype of size 0 in a schema stands for strings of any length.
    any_length = want_dtype.itemsize == 0 and dtype.kind == want_dtype.kind
    if dtype != want_dtype and not any_length:
        raise CorruptFileError(f"{path}: array {name!r} has dtype {dtype}, expected {want_dtype}")
    if len(shape) != len(want_shape):
        raise CorruptFileError(f"{path}: array {name!r} has shape {shape}, expected {_shape_text(want_shape)}")
    for got, want in zip(shape, want_shape):
        if isinstance(want, str):
            # Symbolic sizes (T, Z) must agree between all arrays of the file.
            if sizes.setdefault(want, got) != got:
                raise CorruptFileError(
                    f"{path}: array {name!r} has shape {shape} but other arrays have {want}={sizes[want]}"
                )
        elif got != want:
            raise CorruptFileError(f"{path}: array {name!r} has shape {shape}, expected {_shape_text(want_shape)}")


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _read_header(zf: zipfile.ZipFile, member: str):
    """(shape, dtype) of an ``.npy`` member without decompressing its data."""
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def array_shape(path: str | os.PathLike, name: str) -> tuple[int, ...]:
    """Shape of array ``name`` in an ``.npz`` file, read from its header alone (nothing is decompressed).

    Raises the underlying zip/format error; callers word it for their file kind.
    """
    with zipfile.ZipFile(path) as zf:
        shape, _dtype = _read_header(zf, name + ".npy")
    return tuple(int(n) for n in shape)


def load_episode(path: str | os.PathLike, kind: str = "rollout", keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Load and validate an episode file of ``kind`` ('rollout' or 'series').

    ``keys`` limits which arrays are decompressed (the others are still checked from their
    headers, so a file with inconsistent lengths is rejected either way); optional arrays
    (``OPTIONAL_SCHEMA``) the file lacks are left out. Raises :class:`CorruptFileError`
    naming the file and the problem, never a bare zip/zlib error.
    """
    path = Path(path)
    schema = {**SCHEMAS[kind], **OPTIONAL_SCHEMA}
    wanted = list(schema) if keys is None else list(keys)
    unknown = [k for k in wanted if k not in schema]
    if unknown:
        raise ValueError(f"unknown {kind} arrays {unknown}; a {kind} file has {list(schema)}")
    if not path.is_file():
        raise MissingDataError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {name[:-4] for name in zf.namelist() if name.endswith(".npy")}
            missing = [name for name in SCHEMAS[kind] if name not in members]
            if missing:
                raise CorruptFileError(f"{path}: not a {kind} file, missing arrays {missing}")
            present = [name for name in schema if name in members]
            sizes: dict[str, int] = {}
            for name in present:
                shape, dtype = _read_header(zf, name + ".npy")
                _check_schema_shape(path, name, dtype, shape, schema, sizes)
            out = {}
            for name in (name for name in wanted if name in members):
                with zf.open(name + ".npy") as f:
                    out[name] = np.lib.format.read_array(f, allow_pickle=False)
    except CorruptFileError:
        raise
    except _READ_ERRORS as exc:
        raise CorruptFileError(f"{path}: cannot read episode file, it is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    if sizes.get("T", 1) < 1:
        raise CorruptFileError(f"{path}: episode has no steps")
    return out


def check_episode(path: str | os.PathLike, kind: str = "rollout") -> bool:
    """Cheap check used on rerun: readable zip with the right arrays and consistent headers."""
    try:
        load_episode(path, kind, keys=())
        return True
    except (CorruptFileError, MissingDataError):
        return False


def save_episode(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], kind: str = "rollout",
                 compresslevel: int = 1) -> Path:
    """Validate ``arrays`` against the ``kind`` schema (plus any optional arrays), then save them atomically."""
    schema = {**SCHEMAS[kind], **OPTIONAL_SCHEMA}
    extra = set(arrays) - set(schema)
    missing = set(SCHEMAS[kind]) - set(arrays)
    if extra or missing:
        raise ValueError(f"{kind} arrays must be exactly {list(SCHEMAS[kind])} (optionally {list(OPTIONAL_SCHEMA)}); "
                         f"missing {sorted(missing)}, extra {sorted(extra)}")
    converted = {name: np.asarray(arrays[name]) for name in schema if name in arrays}
    sizes: dict[str, int] = {}
    for name, value in converted.items():
        _check_schema_shape(path, name, value.dtype, value.shape, schema, sizes)
    return save_npz(path, converted, compresslevel=compresslevel)
