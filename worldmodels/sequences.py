"""Streaming latent series as fixed-length sequence windows for M, and M's held-out metrics.

Windows. A series file of T frames (``series/<episode>.npz``, ``storage.SERIES_SCHEMA``) has
T - 1 transitions z_t -> z_{t+1}. A window holds ``sequence_length + 1`` consecutive frames of
*one* episode, so that it carries ``sequence_length`` transitions: the paper's sequences of 999
steps (inputs z_0..z_998, targets z_1..z_999) are one window of a 1000-frame episode, and the
presets set ``rnn.sequence_length = data.max_steps - 1`` so a full episode is one window.
A longer episode is cut into *consecutive* windows starting at frames 0, L, 2L, ... (L =
``sequence_length``) that overlap by one frame, the last frame of a window being the first of
the next: every transition of the episode is then in exactly one window and none is lost at a
cut (the reward and done of the shared frame are counted in both windows; that is 1 step in
L). The last window of an episode, and the only window of a short episode, is padded at the
end with zeros and ``mask`` = 0; a window never holds frames of two episodes.

Element of :func:`sequence_dataset` (one window; batches add a leading axis B), W = L + 1:
``mu``, ``logvar`` float32 (W, Z), ``action`` float32 (W, 3), ``reward`` float32 (W,),
``done`` float32 (W,) (1.0 = terminated), ``mask`` float32 (W,) (1.0 = real frame, a prefix),
``episode`` int32 () (index into ``paths``) and ``start`` int32 () (the window's first frame
in its episode). ``models.mdn_rnn.MDNRNN`` reads the first six and ignores the other two.

Order and determinism (as ``worldmodels.datasets.frame_dataset``): the episodes are visited in
an order shuffled per ``(seed, epoch)``, ``episodes_in_flight`` of them are read by parallel
threads and interleaved window by window, and the windows pass a shuffle buffer seeded from
``(seed, epoch)``. Batch k of epoch e is therefore a function of the files, ``seed``, ``e``
and TensorFlow's global seed only (scripts set it from their config before building a
dataset), which is what lets ``worldmodels.training.train`` skip the batches already done and
resume mid-epoch exactly. Memory: one episode per reader (x2 read ahead) plus the shuffle
buffer of windows, whatever the number of files.

TensorFlow is imported inside the functions that need it, so the cheap header checks run
before (and without) TensorFlow's import.
"""

from __future__ import annotations

import hashlib
import math
import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from config import ConfigError
from worldmodels import storage
from worldmodels.datasets import episode_order, epoch_seed

ACTION_SIZE = 3
# Fewest training steps between two held-out evaluations (see plan_epochs).
MIN_STEPS_PER_EPOCH = 20
# Keys of a window, in the order the reader returns them.
_FLOAT_KEYS = ("mu", "logvar", "action", "reward", "done", "mask")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- headers and windows


def series_shape(path: str | os.PathLike) -> tuple[int, int]:
    """``(T, Z)`` of a series file, from the ``mu`` header (nothing is decompressed)."""
    try:
        shape = storage.array_shape(path, "mu")
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise storage.CorruptFileError(f"{path}: cannot read the series header ({type(exc).__name__}: {exc})") from exc
    return shape[0], shape[1]


def check_series(paths: Sequence[str | os.PathLike], z_size: int | None = None) -> list[int]:
    """Validate every series file from its zip directory and headers; return their lengths T.

    Raises:
        storage.CorruptFileError: naming the first unreadable or malformed file.
        ConfigError: a file whose latents are not ``z_size`` wide (it was encoded by another V).
    """
    lengths = []
    for path in paths:
        storage.load_episode(path, "series", keys=())
        length, width = series_shape(path)
        if z_size is not None and width != z_size:
            raise ConfigError(
                f"{path} holds {width}-d latents but vae.z_size is {z_size}: the series were encoded by another V; "
                "rerun 03_generate_rnn_data.py with the current config (after deleting series/)"
            )
        lengths.append(length)
    return lengths


def series_steps(folder: str | os.PathLike, paths: Sequence[str | os.PathLike] | None = None) -> int:
    """Environment steps recorded in a folder of series (one per frame), or in its files ``paths``;
    a missing or empty folder is a :class:`~worldmodels.storage.MissingDataError`."""
    return int(sum(check_series(storage.list_episodes(folder, "series") if paths is None else paths)))


def window_starts(length: int, sequence_length: int) -> list[int]:
    """First frames of the windows of an episode of ``length`` frames: 0, L, 2L, ... (one window at least).

    ``max(1, ceil((length - 1) / L))`` windows of L transitions each cover the ``length - 1``
    transitions exactly once.
    """
    length = _positive_int(length, "length")
    sequence_length = _positive_int(sequence_length, "sequence_length")
    count = max(1, math.ceil((length - 1) / sequence_length))
    return [k * sequence_length for k in range(count)]


def count_windows(lengths: Sequence[int], sequence_length: int) -> int:
    """Windows per pass over episodes of the given lengths (elements of one epoch of :func:`sequence_dataset`)."""
    return sum(len(window_starts(n, sequence_length)) for n in lengths)


def episode_windows(series: dict[str, np.ndarray], sequence_length: int, episode: int = 0) -> dict[str, np.ndarray]:
    """Cut one episode's arrays into padded windows (numpy; the reader of :func:`sequence_dataset`).

    Args:
        series: ``mu``, ``logvar`` (T, Z), ``action`` (T, 3), ``reward`` (T,), ``done`` (T,).
        sequence_length: L, transitions per window; windows hold W = L + 1 frames.
        episode: the value of the ``episode`` key.

    Returns:
        The keys of a window (module docstring) with a leading axis of N windows: ``mu``
        (N, W, Z) ... ``mask`` (N, W), ``start`` (N,), ``episode`` (N,).
    """
    sequence_length = _positive_int(sequence_length, "sequence_length")
    mu = np.asarray(series["mu"], np.float32)
    if mu.ndim != 2:
        raise ValueError(f"mu must have shape (T, Z), got {mu.shape}")
    length, z_size = mu.shape
    arrays = {
        "mu": mu,
        "logvar": np.asarray(series["logvar"], np.float32),
        "action": np.asarray(series["action"], np.float32),
        "reward": np.asarray(series["reward"], np.float32),
        "done": np.asarray(series["done"], np.float32),
        "mask": np.ones(length, np.float32),
    }
    for key, value in arrays.items():
        if len(value) != length:
            raise ValueError(f"{key} has {len(value)} steps but mu has {length}")
    starts = window_starts(length, sequence_length)
    width = sequence_length + 1
    out = {key: np.zeros((len(starts), width) + value.shape[1:], np.float32) for key, value in arrays.items()}
    for i, start in enumerate(starts):
        stop = min(start + width, length)
        for key, value in arrays.items():
            out[key][i, : stop - start] = value[start:stop]
    out["start"] = np.asarray(starts, np.int32)
    out["episode"] = np.full(len(starts), episode, np.int32)
    return out


# --------------------------------------------------------------------------- streaming


def _read_windows(index, path, sequence_length: int):
    # Runs inside tf.py_function: ``index`` and ``path`` are scalar tensors.
    path = path.numpy().decode("utf-8")
    with storage.reading(path):
        series = storage.load_episode(path, "series", keys=("mu", "logvar", "action", "reward", "done"))
        windows = episode_windows(series, sequence_length, int(index.numpy()))
    return [windows[key] for key in _FLOAT_KEYS] + [windows["start"], windows["episode"]]


def _windows_dataset(sequence_length: int, z_size: int):
    """``(index, path) -> tf.data.Dataset`` of that episode's windows, one element each."""
    import tensorflow as tf

    width = sequence_length + 1
    shapes = {"mu": (None, width, z_size), "logvar": (None, width, z_size), "action": (None, width, ACTION_SIZE),
              "reward": (None, width), "done": (None, width), "mask": (None, width), "start": (None,),
              "episode": (None,)}

    def read(index, path):
        values = tf.py_function(lambda i, p: _read_windows(i, p, sequence_length), [index, path],
                                [tf.float32] * len(_FLOAT_KEYS) + [tf.int32, tf.int32])
        out = dict(zip(_FLOAT_KEYS + ("start", "episode"), values))
        for key, value in out.items():
            value.set_shape(shapes[key])
        return out

    def windows(index, path):
        # unbatch copies each window out of the episode's arrays (as datasets._episode_frames
        # does for frames), so a window waiting in the shuffle buffer does not pin its episode.
        return tf.data.Dataset.from_tensors((index, path)).map(read).unbatch()

    return windows


def sequence_dataset(paths: Sequence[str | os.PathLike], sequence_length: int, batch_size: int, seed: int = 0,
                     epoch: int = 0, repeat: bool = False, shuffle: bool = True, episodes_in_flight: int = 8,
                     shuffle_buffer: int = 128, drop_remainder: bool = False):
    """A ``tf.data`` pipeline of batches of sequence windows streamed from series files.

    Args:
        paths: series files (``storage.SERIES_SCHEMA``), all with the same Z.
        sequence_length: L, transitions per window; the time axis of a batch is W = L + 1.
        batch_size: windows per batch B.
        seed, epoch: fix the episode order and window shuffle; the same values give the same
            batches (module docstring).
        repeat: cycle forever, the second pass in the order of epoch ``epoch + 1`` and so on.
            Training uses it so that an epoch (a chunk of steps) never runs out of windows.
        shuffle: ``False`` for evaluation: episodes in the given order, windows in time order.
        episodes_in_flight: episodes read in parallel and interleaved when shuffling.
        shuffle_buffer: windows in the shuffle buffer (memory: W * (2 Z + 6) * 4 bytes each,
            280 KB at the paper's size).
        drop_remainder: drop a last batch of fewer than B windows.

    Returns:
        A dataset of dicts (module docstring) with a leading batch axis. A file that cannot be
        read raises while iterating with ``CorruptFileError: <file>: ...`` in the message
        (``worldmodels.datasets.surface_corrupt_files`` turns it into the exception; any other
        failure of the reader is an ``EpisodeReadError: <file>: ...``).
    """
    import tensorflow as tf

    sequence_length = _positive_int(sequence_length, "sequence_length")
    batch_size = _positive_int(batch_size, "batch_size")
    episodes_in_flight = _positive_int(episodes_in_flight, "episodes_in_flight")
    shuffle_buffer = _positive_int(shuffle_buffer, "shuffle_buffer")
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("sequence_dataset needs at least one series file")
    _, z_size = series_shape(paths[0])
    windows = _windows_dataset(sequence_length, z_size)
    signature = (tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.string))

    if not shuffle:
        files = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int32), paths))
        if repeat:
            files = files.repeat()
        elements = files.flat_map(windows)
    else:
        if repeat:
            def ordered() -> Iterator[tuple[int, str]]:
                e = epoch
                while True:
                    yield from ((int(i), paths[i]) for i in episode_order(len(paths), seed, e))
                    e += 1

            # Only file names pass through the generator; the reading happens in the
            # interleave's threads (zlib releases the GIL).
            files = tf.data.Dataset.from_generator(ordered, output_signature=signature)
        else:
            order = episode_order(len(paths), seed, epoch).astype(np.int32)
            files = tf.data.Dataset.from_tensor_slices((order, [paths[i] for i in order]))
        cycle = min(episodes_in_flight, len(paths))
        elements = files.interleave(windows, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
                                    deterministic=True)
        elements = elements.shuffle(shuffle_buffer, seed=epoch_seed(seed, epoch), reshuffle_each_iteration=False)
    return elements.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def plan_epochs(steps: int, num_windows: int, batch_size: int,
                min_steps_per_epoch: int = MIN_STEPS_PER_EPOCH) -> tuple[int, int]:
    """``(steps_per_epoch, epochs)`` for training ``steps`` updates on ``num_windows`` windows.

    M is trained for a number of *steps* (the paper's 4000), not passes. An "epoch" is a chunk
    of steps of about one pass over the training windows (``num_windows // batch_size``
    batches), but at least ``min_steps_per_epoch`` (with few episodes a pass is a batch or
    two, and evaluating after each would cost more than training) and at most ``steps``. It
    is the unit of held-out evaluation and TensorBoard points, and always ends with a
    checkpoint. Starting from ``ceil(steps / target)``
    epochs, the first number of epochs up to twice that which divides ``steps`` is used, so
    that exactly ``steps`` updates are made (4000 steps on 95 batches a pass: 50 epochs of 80);
    when there is none (``steps`` prime, say) ``steps_per_epoch = ceil(steps / epochs)`` and
    ``epochs * steps_per_epoch`` exceeds ``steps`` by fewer than ``epochs``.
    """
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(num_windows, bool) or not isinstance(num_windows, (int, np.integer)) or num_windows < 0:
        raise ValueError(f"num_windows must be a non-negative integer, got {num_windows!r}")
    min_steps_per_epoch = _positive_int(min_steps_per_epoch, "min_steps_per_epoch")
    target = min(steps, max(min_steps_per_epoch, int(num_windows) // batch_size))
    first = math.ceil(steps / target)
    for epochs in range(first, min(2 * first, steps) + 1):
        if steps % epochs == 0:
            return steps // epochs, epochs
    return math.ceil(steps / first), first


# --------------------------------------------------------------------------- evaluation


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve (numpy): P(score of a random positive > that of a random negative).

    Ties count one half (average ranks, the Mann-Whitney U statistic). ``None`` when the
    labels hold no positive or no negative: the AUC is undefined then.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same size, got {labels.shape} and {scores.shape}")
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    # Tied scores share the mean of the ranks they span.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0
    u = ranks[labels].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def latent_noise(seed: int, name: str, length: int, z_size: int) -> np.ndarray:
    """Standard normal noise float32 (length, z_size) for the episode file ``name``, fixed by ``(seed, name)``.

    Rows are drawn in order, so a longer draw starts with the rows of a shorter one: the
    windows of an episode and the whole episode see the same noise at the same frame.
    """
    key = int.from_bytes(hashlib.sha256(f"{int(seed)}/{name}".encode("utf-8")).digest()[:8], "big")
    return np.random.default_rng(key).standard_normal((length, z_size), dtype=np.float32)


def sampled_latents(series: dict[str, np.ndarray], seed: int, name: str) -> np.ndarray:
    """z = mu + exp(logvar / 2) * eps (T, Z) of one episode, eps from :func:`latent_noise` (what training sees)."""
    mu, logvar = series["mu"], series["logvar"]
    return mu + np.exp(0.5 * logvar) * latent_noise(seed, name, *mu.shape)


class _HeadScores:
    """Running sums of the reward, done and action heads' metrics over the batches of :func:`evaluate_model`.

    ``action_mean`` (A,), optional: the constant prediction of the "train mean" action baseline.
    """

    def __init__(self, model, action_mean=None):
        self.model, self.action_mean = model, action_mean
        self.reward_error, self.tile_error, self.tile_steps = 0.0, 0.0, 0
        self.done_labels, self.done_scores = [], []
        self.action_errors: dict[str, np.ndarray | float] = {"model": 0.0, "persistence": 0.0, "train_mean": 0.0}

    def add(self, out: dict, batch: dict, own: np.ndarray, pairs: np.ndarray) -> None:
        """One batch: M's outputs, the batch, ``own`` (B, W) its frames not scored before and ``pairs``
        (B, W - 1) its transitions."""
        import tensorflow as tf

        if "reward" in out:
            squared = np.square(out["reward"].numpy() - batch["reward"].numpy())
            tiles = own & (batch["reward"].numpy() > 0)
            self.reward_error += float(squared[own].sum())
            self.tile_error += float(squared[tiles].sum())
            self.tile_steps += int(tiles.sum())
        if "done" in out:
            self.done_scores.append(tf.sigmoid(out["done"]).numpy()[own])
            self.done_labels.append(batch["done"].numpy()[own] > 0.5)
        if "action" in out:
            # The target of step t is a_{t+1}; the baselines predict a_t ("persistence") and a constant.
            action = batch["action"].numpy().astype(np.float64)
            guesses = {"model": out["action"].numpy()[:, :-1], "persistence": action[:, :-1]}
            if self.action_mean is not None:
                guesses["train_mean"] = np.broadcast_to(self.action_mean, action[:, :-1].shape)
            for name, guess in guesses.items():
                squared = np.square(guess - action[:, 1:])[pairs]
                self.action_errors[name] = self.action_errors[name] + squared.sum(axis=0)

    def result(self, steps: int, transitions: int) -> dict:
        """The heads' entries of :func:`evaluate_model`'s result."""
        result = {}
        if self.model.reward_head:
            result["reward_mse"] = self.reward_error / steps
            result["reward_mse_tiles"] = self.tile_error / self.tile_steps if self.tile_steps else None
        if self.model.done_head:
            labels, scores = np.concatenate(self.done_labels), np.concatenate(self.done_scores)
            result["done_accuracy"] = float(np.mean((scores > 0.5) == labels))
            result["done_auc"] = roc_auc(labels, scores)
            result["done_positives"] = int(labels.sum())
        if getattr(self.model, "action_head", False):
            per_component = self.action_errors["model"] / transitions
            result["action_mse"] = float(np.mean(per_component))
            result["action_mse_per_component"] = [float(v) for v in per_component]
            result["action_mse_persistence"] = float(np.mean(self.action_errors["persistence"] / transitions))
            if self.action_mean is not None:
                result["action_mse_train_mean"] = float(np.mean(self.action_errors["train_mean"] / transitions))
        return result


def evaluate_model(model, paths: Sequence[str | os.PathLike], sequence_length: int, batch_size: int,
                   sample_seed: int | None = None, action_mean=None) -> dict:
    """M's metrics on every window of ``paths``, streamed.

    z is V's posterior mean (``sample_seed=None``, as ``MDNRNN.test_step``) or a draw from V's
    posterior, z = mu + sigma * eps with eps from :func:`latent_noise` (``sample_seed``), the
    kind of z M is trained on. Scores the same targets as ``models.mdn_rnn.baseline_nlls`` on
    these episodes: every transition z_t -> z_{t+1} once, and the reward and done of every
    frame once (the frame a window shares with the previous one is skipped for those).
    Memory: one batch, plus two floats per frame for the reward and done predictions.

    Returns:
        ``z_nll`` (mean NLL in nats per z dimension per transition), ``z_nll_per_dimension``
        (list of Z), ``transitions``, ``steps``; with a reward head ``reward_mse`` and
        ``reward_mse_tiles`` (on the steps with a positive reward, CarRacing's new tiles; ``None``
        without any); with a done head ``done_accuracy`` (threshold 0.5), ``done_auc`` (``None`` without both
        classes), ``done_positives``; with an action head (``model.action_head``) ``action_mse``
        (mean over the action components of the squared error of the predicted a_{t+1}, on the
        transitions), ``action_mse_per_component`` (list of A), ``action_mse_persistence`` (the
        baseline a_{t+1} = a_t) and, when ``action_mean`` (A,) is given, ``action_mse_train_mean``
        (the baseline a_{t+1} = ``action_mean``).
    """
    import tensorflow as tf

    from models.mdn_rnn import mixture_log_prob

    names = [Path(p).name for p in paths]
    noise: dict[str, np.ndarray] = {}
    nll_sum, transitions, steps = 0.0, 0, 0
    heads = _HeadScores(model, action_mean)
    for batch in sequence_dataset(paths, sequence_length, batch_size, shuffle=False):
        mask = batch["mask"].numpy() > 0
        z = np.array(batch["mu"])
        starts = batch["start"].numpy()
        if sample_seed is not None:
            width = z.shape[1]
            for i, (episode, start) in enumerate(zip(batch["episode"].numpy(), starts)):
                name = names[episode]
                if name not in noise or len(noise[name]) < start + width:
                    # Windows arrive in time order: keep one episode's noise, grown as needed.
                    noise = {name: latent_noise(sample_seed, name, start + width, z.shape[2])}
                eps = noise[name][start:start + width]
                z[i] = np.where(mask[i, :, None], z[i] + np.exp(0.5 * batch["logvar"].numpy()[i]) * eps, 0.0)
        out = model(tf.concat([z, batch["action"]], axis=-1), training=False)
        log_pi, mean, log_sigma = model.split(out["mdn"][:, :-1])
        nll = -mixture_log_prob(z[:, 1:], log_pi, mean, log_sigma).numpy()
        pairs = mask[:, :-1] & mask[:, 1:]
        nll_sum = nll_sum + np.where(pairs[..., None], nll, 0.0).astype(np.float64).sum(axis=(0, 1))
        transitions += int(pairs.sum())
        # A frame shared with the previous window was scored there already.
        own = mask.copy()
        own[:, 0] &= starts == 0
        steps += int(own.sum())
        heads.add(out, batch, own, pairs)
    if transitions == 0:
        raise ValueError("the episodes have no transition to score: every episode has a single frame")
    per_dimension = nll_sum / transitions
    return {"z_nll": float(per_dimension.mean()), "z_nll_per_dimension": [float(v) for v in per_dimension],
            "transitions": transitions, "steps": steps, **heads.result(steps, transitions)}
