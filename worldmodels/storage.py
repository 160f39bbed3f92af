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
import hashlib
import io
import json
import math
import os
import re
import tempfile
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

# Defined in config (the bottom of the import graph, which needs them too) and used by every stage as
# storage.CorruptFileError, storage.MissingDataError and storage.read_json.
from config import CorruptFileError, MissingDataError, read_json  # noqa: F401

TMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
EPISODE_SUFFIX = ".npz"


class EpisodeReadError(RuntimeError):
    """Reading an episode file failed for another reason than its content (a bug, memory, the interpreter)."""


# Called with the one-line message of every failure inside :func:`reading`; ``worldmodels.cli``
# registers its watchdog here, so a stage whose reader thread failed ends even if TensorFlow hangs.
READER_FAILURE_HOOKS: list[Callable[[str], None]] = []


@contextlib.contextmanager
def reading(path: str | os.PathLike):
    """Make every failure of the block name ``path``, for readers running on ``tf.data`` or pool threads.

    Such an error reaches the main thread only as text inside a TensorFlow error (or a
    future's result), so it must carry the file name itself. :class:`CorruptFileError` and
    :class:`MissingDataError` already name it and pass unchanged; anything else becomes an
    :class:`EpisodeReadError` naming the file and the original error. Every failure is also
    passed to :data:`READER_FAILURE_HOOKS`.
    """
    try:
        yield
    except (CorruptFileError, MissingDataError) as exc:
        for hook in READER_FAILURE_HOOKS:
            hook(str(exc))
        raise
    except Exception as exc:
        message = f"{path}: reading failed ({type(exc).__name__}: {exc})"
        for hook in READER_FAILURE_HOOKS:
            hook(message)
        raise EpisodeReadError(message) from exc


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


# --------------------------------------------------------------------------- manifests

MANIFEST_NAME = "MANIFEST.sha256"


class Stopwatch:
    """Wall time of a piece of work that may be killed and resumed, kept in a JSON file: ``{"seconds": s}``.

    ``with Stopwatch(path) as watch:`` starts from the seconds saved by earlier runs of the same work and
    rewrites the file every ``every`` seconds (from a daemon thread) and on exit, so a kill loses at most
    ``every`` seconds of the count; ``watch.seconds`` is the running total. A damaged file counts as 0 s.
    """

    def __init__(self, path: str | os.PathLike, every: float = 60.0):
        self.path, self.every = Path(path), float(every)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.before = float(read_json(self.path)["seconds"])
        except (MissingDataError, CorruptFileError, KeyError, TypeError, ValueError):
            self.before = 0.0
        self._start = None

    @property
    def seconds(self) -> float:
        return self.before + (0.0 if self._start is None else time.monotonic() - self._start)

    def save(self, seconds: float | None = None) -> None:
        atomic_write_json(self.path, {"seconds": self.seconds if seconds is None else seconds})

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.save()

    def __enter__(self) -> "Stopwatch":
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._tick, name=f"stopwatch {self.path.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.before, self._start = self.seconds, None
        self.save(self.before)


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def named_folder(root: Path, name_or_path) -> Path:
    """``root/<name>`` for a bare name, or the folder itself if an existing folder or a path is given."""
    path = Path(name_or_path)
    return path if path.is_dir() or len(path.parts) > 1 else Path(root) / str(name_or_path)


def manifest_folders(root: Path) -> list[str]:
    """Names of the folders under ``root`` that hold a ``MANIFEST.sha256`` (complete ones), sorted."""
    root = Path(root)
    return sorted(p.name for p in root.glob("*") if (p / MANIFEST_NAME).exists()) if root.is_dir() else []


def write_manifest(folder: str | os.PathLike, names: Iterable[str]) -> Path:
    """Write ``<folder>/MANIFEST.sha256`` (``sha256sum`` format) for ``names``, paths relative to ``folder``.

    Written last and atomically, so a folder with a manifest is complete; ``sha256sum -c`` checks it too.
    """
    folder = Path(folder)
    lines = "".join(f"{sha256(folder / name)}  {name}\n" for name in sorted(names))
    return atomic_write_text(folder / MANIFEST_NAME, lines)


def read_manifest(folder: str | os.PathLike, what: str) -> dict[str, str]:
    """``{relative path: digest}`` listed by ``<folder>/MANIFEST.sha256``; MissingDataError if there is none."""
    manifest = Path(folder) / MANIFEST_NAME
    if not manifest.exists():
        raise MissingDataError(f"no {what} at {folder} (no {MANIFEST_NAME})")
    listed = {}
    for line in manifest.read_text().splitlines():
        digest, _, name = line.partition("  ")
        if not name.strip() or len(digest.strip()) != 64:
            raise CorruptFileError(f"{manifest}: the line {line!r} is not '<sha256>  <file>'")
        listed[name.strip()] = digest.strip()
    return listed


def verify_manifest(folder: str | os.PathLike, what: str, expected: Iterable[str] | None = None) -> dict[str, str]:
    """Check every file listed in ``<folder>/MANIFEST.sha256`` (and, if given, that it lists exactly ``expected``).

    Returns the listing. Raises MissingDataError if there is no manifest and CorruptFileError (one line)
    for a missing file, a file whose digest differs, or a listing other than ``expected``.
    """
    folder = Path(folder)
    listed = read_manifest(folder, what)
    if expected is not None and set(listed) != set(expected):
        raise CorruptFileError(f"{folder / MANIFEST_NAME} lists {sorted(listed)}, expected {sorted(expected)}")
    for name, digest in listed.items():
        if not (folder / name).exists():
            raise CorruptFileError(f"{folder / name} is missing; the {what} is incomplete")
        actual = sha256(folder / name)
        if actual != digest:
            raise CorruptFileError(f"{folder / name} has SHA-256 {actual[:12]}..., its manifest says "
                                   f"{digest[:12]}...: the file is damaged or was replaced; restore it")
    return listed


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


def episodes_by_policy(folders: Iterable[str | os.PathLike], per_policy: int, exclude=()) -> dict[str, list[Path]]:
    """``{tag: [path, ...]}``: the first ``per_policy`` rollout files of each policy tag in ``folders``, in order.

    The tag is an episode's ``policy`` (``"brownian"`` for files written before tags existed); files whose
    resolved path is in ``exclude`` are skipped. Reads only each file's ``policy`` array.
    """
    if per_policy < 1:
        raise ValueError(f"per_policy must be at least 1, got {per_policy}")
    excluded = {Path(p).resolve() for p in exclude}
    chosen: dict[str, list[Path]] = {}
    for folder in folders:
        for path in list_episodes(folder, "rollouts"):
            if path.resolve() in excluded:
                continue
            tag = str(load_episode(path, keys=("policy",)).get("policy", "brownian"))
            if len(chosen.setdefault(tag, [])) < per_policy:
                chosen[tag].append(path)
    return chosen


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


# The .npy header is a Python dict literal, e.g. "{'descr': '<f4', 'fortran_order': False,
# 'shape': (1000, 32), }". numpy parses it with ast.literal_eval, whose AST constructor is not
# thread-safe (cpython gh-106905: "SystemError: AST constructor recursion depth mismatch" when
# tf.data's reader threads parse headers at once), so the fixed format numpy writes is parsed
# here with a regular expression instead. Anything else (structured dtypes, objects) is refused.
_NPY_MAGIC = b"\x93NUMPY"
_NPY_ENTRY = re.compile(r"\s*'(descr|fortran_order|shape)'\s*:\s*('[^']*'|True|False|\([0-9,\s]*\))\s*,?")


def _parse_header_text(text: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` header dict, without ``ast``; ValueError if unsupported."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise ValueError(f"unsupported .npy header {text.strip()!r}")
    entries, position, inner = {}, 0, body[1:-1]
    while inner[position:].strip():
        match = _NPY_ENTRY.match(inner, position)
        if match is None or match.group(1) in entries:
            raise ValueError(f"unsupported .npy header {text.strip()!r}")
        entries[match.group(1)] = match.group(2)
        position = match.end()
    if set(entries) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f".npy header {text.strip()!r} lacks descr, fortran_order or shape")
    dims = [d.strip() for d in entries["shape"][1:-1].split(",")]
    if dims and dims[-1] == "":
        dims.pop()  # the trailing comma of a 1-tuple "(1000,)"
    if len(dims) == 1 and "," not in entries["shape"]:
        raise ValueError(f".npy header {text.strip()!r}: shape is not a tuple")
    dtype = np.dtype(entries["descr"][1:-1])
    if dtype.hasobject:
        raise ValueError(f".npy header {text.strip()!r}: object arrays are not allowed")
    return tuple(int(d) for d in dims), entries["fortran_order"] == "True", dtype


def _read_exactly(f, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"expected {size} bytes, got {len(data)}")
    return data


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream ``f``, leaving ``f`` at the data.

    Thread-safe replacement for ``np.lib.format.read_array_header_*``: format versions 1-3,
    no ``ast`` (see ``_NPY_ENTRY``). Raises ValueError or EOFError on a malformed header.
    """
    magic = _read_exactly(f, 8)
    if magic[:6] != _NPY_MAGIC or magic[6] not in (1, 2, 3):
        raise ValueError(f"not an .npy stream (magic {magic!r})")
    length_size = 2 if magic[6] == 1 else 4
    length = int.from_bytes(_read_exactly(f, length_size), "little")
    encoding = "utf-8" if magic[6] == 3 else "latin1"
    return _parse_header_text(_read_exactly(f, length).decode(encoding))


def read_npy(f) -> np.ndarray:
    """The array of the ``.npy`` stream ``f`` (thread-safe ``np.lib.format.read_array(f, allow_pickle=False)``)."""
    shape, fortran_order, dtype = read_npy_header(f)
    count = math.prod(shape)
    buffer = bytearray(count * dtype.itemsize)
    view, filled = memoryview(buffer), 0
    while filled < len(buffer):
        got = f.readinto(view[filled:])
        if not got:
            raise EOFError(f"array data ends after {filled} of {len(buffer)} bytes")
        filled += got
    # A bytearray keeps the array writable, as numpy's reader returns it.
    return np.frombuffer(buffer, dtype, count).reshape(shape, order="F" if fortran_order else "C")


def _read_header(zf: zipfile.ZipFile, member: str):
    """(shape, dtype) of an ``.npy`` member without decompressing its data."""
    with zf.open(member) as f:
        shape, _fortran, dtype = read_npy_header(f)
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
                    out[name] = read_npy(f)
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


def save_figure(fig, out, dpi: int = 80) -> Path:
    """Write the matplotlib figure ``fig`` as a 256-colour PNG to ``out`` atomically (no half file is left).

    A palette PNG is a third to a quarter of the size of the RGBA one for these figures
    (flat plots and blurry 64x64 frames), which keeps the repository's README images small.
    """
    from PIL import Image

    out = Path(out)
    if not fig.get_axes() or fig.get_axes()[0].get_subplotspec() is not None:
        fig.tight_layout()  # plots made with add_subplot(s); a hand-placed diagram keeps its layout
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                                       dither=Image.Dither.NONE)
    atomic_write(out, lambda f: image.save(f, format="PNG", optimize=True))
    return out
