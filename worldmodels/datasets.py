"""Streaming frames from rollout files with bounded memory, and the train / held-out split.

Nothing here loads the dataset into memory. :func:`frame_dataset` reads a few episodes at a
time and yields shuffled batches of frames, uint8 (B, 64, 64, 3), so the memory in use is
about ``episodes_in_flight`` episodes (x2 while the next ones are read ahead) plus the
shuffle buffer of frames, whether there are ten or ten thousand episode files. At the paper's
scale (1000 frames of 12,288 bytes per episode) the defaults hold 8-16 episodes (100-200 MB)
and a buffer of 10,000 frames (123 MB).

The split is by *episode*, never by frame: consecutive frames of one episode are nearly
identical, so a frame-level split would leak the held-out set into training.

Order and determinism: batch ``k`` of epoch ``e`` is a function of the episode files, the
``seed``, ``e`` and TensorFlow's global seed only, so a training run can stop anywhere and
later continue from batch ``k`` exactly (:mod:`worldmodels.training` skips the batches already
done). The global seed matters because ``tf.data``'s shuffle combines its own seed with it:
scripts set it once at start from their config (``keras.utils.set_random_seed``), before
building any dataset, so every session of a run sees the same batches.

TensorFlow is imported inside the functions that build pipelines only: the split and the
header checks are what every stage runs first, and a rerun with nothing to do, or a missing
file, should be reported in a fraction of a second rather than after TensorFlow's import.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from worldmodels import storage

FRAME_SHAPE = (64, 64, 3)


# --------------------------------------------------------------------------- split


def _unit_hash(name: str, seed: int) -> float:
    """A number in [0, 1) that depends only on the file name and the seed (stable across runs and machines)."""
    digest = hashlib.sha256(f"{int(seed)}/{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_episodes(paths: Sequence[str | os.PathLike], heldout_fraction: float, seed: int = 0
                   ) -> tuple[list[Path], list[Path]]:
    """Split episode files into ``(train_paths, heldout_paths)``, by episode, deterministically.

    An episode is held out when a hash of ``(seed, file name)`` falls below
    ``heldout_fraction``. The decision depends on the file's *name* only, not on the folder
    or on the other files, so

    * the same episode is in the same set for V (``rollouts/``) and M (``series/``, files of the
      same names), and
    * recording more episodes later never moves an existing episode between the sets.

    With few episodes the hash may hold out none (or all); then the episode with the lowest
    (highest) hash is moved, so both sets are non-empty when ``heldout_fraction > 0``. Only in
    that corner case can adding episodes change the set of an existing one.

    Args:
        paths: episode files (any order; only their names are hashed).
        heldout_fraction: expected fraction of episodes held out, in [0, 1).
        seed: changes which episodes are held out.

    Returns:
        Two lists of ``Path``, each sorted by name.

    Raises:
        ValueError: for a fraction outside [0, 1) or duplicate file names.
        storage.MissingDataError: for an empty list, or fewer than 2 episodes when a held-out
            set is asked for (the message says how to fix it).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    paths = sorted((Path(p) for p in paths), key=lambda p: p.name)
    names = [p.name for p in paths]
    if len(set(names)) != len(names):
        raise ValueError("episode file names must be unique: the split is decided by the file name")
    if not paths:
        raise storage.MissingDataError("no episodes to split")
    if heldout_fraction == 0.0:
        return paths, []
    if len(paths) < 2:
        raise storage.MissingDataError(
            f"{len(paths)} episode is too few to hold out a fraction of {heldout_fraction} for validation: "
            "record at least 2 episodes, or set heldout_fraction=0"
        )
    scores = [_unit_hash(name, seed) for name in names]
    heldout = {i for i, s in enumerate(scores) if s < heldout_fraction}
    if not heldout:
        heldout = {int(np.argmin(scores))}
    if len(heldout) == len(paths):
        heldout.discard(int(np.argmax(scores)))
    train = [p for i, p in enumerate(paths) if i not in heldout]
    return train, [p for i, p in enumerate(paths) if i in heldout]


# --------------------------------------------------------------------------- cheap checks


def save_split(folder: str | os.PathLike, heldout_fraction: float, seed: int, train: Sequence[Path],
               heldout: Sequence[Path]) -> Path:
    """Write ``folder/split.json``: the fraction and seed of :func:`split_episodes` and the file names of each set.

    V and M record the split they trained on, so later tools (the comparison, the figures, M's
    check that it holds out V's episodes) read it instead of recomputing it.
    """
    return storage.atomic_write_json(Path(folder) / "split.json", {
        "heldout_fraction": heldout_fraction, "seed": seed,
        "train": [p.name for p in train], "heldout": [p.name for p in heldout]})


def episode_length(path: str | os.PathLike) -> int:
    """Number of frames T of a rollout file, read from the ``obs`` header (no decompression of frames)."""
    try:
        shape = storage.array_shape(path, "obs")
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise storage.CorruptFileError(f"{path}: cannot read the frame count ({type(exc).__name__}: {exc})") from exc
    return shape[0]


def check_episodes(paths: Sequence[str | os.PathLike]) -> list[int]:
    """Validate every rollout file from its zip directory and array headers; return their lengths.

    This is cheap (no frame is decompressed), so training can refuse a truncated or foreign
    file before it starts rather than an hour later. A file whose compressed *data* is
    damaged passes this check and is reported by name when it is streamed.

    Raises:
        storage.CorruptFileError: naming the first bad file and what is wrong with it.
    """
    lengths = []
    for path in paths:
        storage.load_episode(path, "rollout", keys=())
        lengths.append(episode_length(path))
    return lengths


def count_frames(paths: Sequence[str | os.PathLike]) -> int:
    """Total number of frames in rollout files, from their headers (for steps per epoch and progress bars)."""
    return sum(episode_length(p) for p in paths)


def steps_per_epoch(num_frames: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches :func:`frame_dataset` yields per epoch for ``num_frames`` frames."""
    return num_frames // batch_size if drop_remainder else math.ceil(num_frames / batch_size)


# --------------------------------------------------------------------------- streaming


def epoch_seed(seed: int, epoch: int) -> int:
    """A 31-bit seed for epoch ``epoch`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] >> 1)


def episode_order(num_episodes: int, seed: int, epoch: int) -> np.ndarray:
    """Permutation of episode indices for one epoch, a function of ``(seed, epoch)`` only."""
    return np.random.default_rng(epoch_seed(seed, epoch)).permutation(num_episodes)


def _load_frames(path) -> np.ndarray:
    # Runs inside tf.py_function: ``path`` is a scalar string tensor.
    path = path.numpy().decode("utf-8")
    with storage.reading(path):
        return storage.load_episode(path, "rollout", keys=("obs",))["obs"]


def _load_frames_tensor(path):
    import tensorflow as tf

    frames = tf.py_function(_load_frames, [path], tf.uint8)
    frames.set_shape((None, *FRAME_SHAPE))
    return frames


def _episode_frames(path):
    """One episode file (scalar string tensor) -> a ``tf.data.Dataset`` of its frames, uint8 (64, 64, 3) each."""
    import tensorflow as tf

    # ``unbatch`` copies each frame out of the episode array. ``from_tensor_slices(frames)``
    # would not: its aligned slices alias the whole episode's buffer, so one frame waiting in
    # the shuffle buffer would keep its entire episode in memory, and memory would grow with
    # the number of episodes streamed (measured: +70 MB from 24 to 192 episodes of 200 frames
    # with a 1000-frame buffer, against +14 MB with unbatch).
    return tf.data.Dataset.from_tensors(path).map(_load_frames_tensor).unbatch()


def frame_dataset(paths: Sequence[str | os.PathLike], batch_size: int, shuffle_buffer: int = 10_000,
                  episodes_in_flight: int = 8, seed: int = 0, epoch: int = 0, repeat: bool = False,
                  shuffle: bool = True, drop_remainder: bool = False):
    """A ``tf.data`` pipeline of frame batches streamed from rollout files.

    Episodes are visited in an order shuffled per epoch; ``episodes_in_flight`` of them are
    read in parallel threads and interleaved frame by frame, the frames pass through a
    shuffle buffer of ``shuffle_buffer`` frames, and are batched and prefetched.

    Args:
        paths: rollout files (``storage.ROLLOUT_SCHEMA``).
        batch_size: frames per batch B.
        shuffle_buffer: frames in the shuffle buffer (memory: 12,288 bytes each).
        episodes_in_flight: episodes read and interleaved at once (memory: one episode each,
            plus as many read ahead).
        seed, epoch: the episode order and frame shuffle of this epoch; the same values give
            the same batches.
        repeat: cycle forever, with the order of epoch ``epoch + 1`` on the second pass and so on.
        shuffle: ``False`` for evaluation: episodes in the given order, frames in time order,
            one episode at a time.
        drop_remainder: drop the last batch when it has fewer than B frames.

    Returns:
        A dataset of uint8 tensors (B, 64, 64, 3) (the last batch of an epoch may be smaller
        unless ``drop_remainder``). Every frame of every episode appears exactly once per epoch.
        A file that cannot be read raises an error while iterating whose message contains
        ``CorruptFileError: <file>: ...`` (``EpisodeReadError`` for any other failure of the
        reader); wrap the loop in :func:`surface_corrupt_files` to get that exception instead.
    """
    import tensorflow as tf

    for name, value in (("batch_size", batch_size), ("shuffle_buffer", shuffle_buffer),
                        ("episodes_in_flight", episodes_in_flight)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("frame_dataset needs at least one episode file")

    if not shuffle:
        files = tf.data.Dataset.from_tensor_slices(paths)
        if repeat:
            files = files.repeat()
        frames = files.flat_map(_episode_frames)
    else:
        if repeat:
            def ordered_paths() -> Iterator[str]:
                e = epoch
                while True:
                    yield from (paths[i] for i in episode_order(len(paths), seed, e))
                    e += 1

            # The generator only yields file names, so its GIL cost is negligible; the frames
            # are read by the interleave's parallel threads (zlib releases the GIL while inflating).
            files = tf.data.Dataset.from_generator(ordered_paths, output_signature=tf.TensorSpec((), tf.string))
        else:
            files = tf.data.Dataset.from_tensor_slices([paths[i] for i in episode_order(len(paths), seed, epoch)])
        cycle = min(episodes_in_flight, len(paths))
        frames = files.interleave(_episode_frames, cycle_length=cycle, block_length=1,
                                  num_parallel_calls=cycle, deterministic=True)
        frames = frames.shuffle(shuffle_buffer, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
    return frames.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


# The errors of storage.reading() that name their file; the pipeline hands them over as text.
_READER_ERRORS = {cls.__name__: cls for cls in
                  (storage.CorruptFileError, storage.MissingDataError, storage.EpisodeReadError)}
_READER_MESSAGE = re.compile(rf"\b({'|'.join(_READER_ERRORS)}): (.+)")


def reader_error(exc: BaseException) -> Exception | None:
    """The storage error that a TensorFlow error carries from a pipeline's reader, or ``None``.

    TensorFlow wraps exceptions of ``tf.py_function`` in an ``OpError`` with the Python
    traceback in its message; this finds the reader's one-line message naming the file and
    rebuilds its exception (``CorruptFileError``, ``MissingDataError`` or ``EpisodeReadError``).
    """
    import tensorflow as tf

    if not isinstance(exc, tf.errors.OpError):
        return None
    match = _READER_MESSAGE.search(str(exc.message))
    return None if match is None else _READER_ERRORS[match.group(1)](match.group(2).strip())


@contextlib.contextmanager
def surface_corrupt_files():
    """Turn a TensorFlow error raised by a failed reader inside the pipeline into the storage error naming its file.

    The user needs only the file name and the problem, not TensorFlow's wrapping (see
    :func:`reader_error`); other errors pass unchanged.
    """
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as exc:
        error = reader_error(exc)
        if error is None:
            raise
        raise error from exc


def training_fingerprint(cfg, train_paths, keys, **counts) -> dict:
    """Everything that fixes the sequence of training batches and updates of a stage.

    The training episodes (count and a hash of their names), the given sizes (frames,
    windows...) and the config values of ``keys``: a checkpoint resumes only if this matches,
    and a finished run whose fingerprint differs is reported as made from other data.
    """
    import hashlib

    import config

    names = "\n".join(Path(p).name for p in train_paths).encode("utf-8")
    return {
        "train_episodes": len(train_paths),
        "train_episodes_sha256": hashlib.sha256(names).hexdigest()[:16],
        **counts,
        **{key: config.get(cfg, key) for key in keys},
    }
