"""Resumable training: a run killed at any moment continues from its last checkpoint, exactly.

:func:`train` runs a compiled Keras model for a number of epochs of ``steps_per_epoch``
batches each and keeps one checkpoint in ``checkpoint_dir``:

* ``checkpoint.npz``: every variable of the model (including the state of its
  ``SeedGenerator``s, so the random draws continue where they stopped), of the optimizer
  (Adam's moments and its iteration counter) and of the metrics (the running means of the
  epoch), plus the position ``(epoch, step)`` and the history. It is one file written
  atomically (``storage.atomic_write``), so a crash leaves the previous or the new checkpoint,
  never a mix of the two.
* ``training_state.json``: a readable copy of the position and history (the ``.npz`` is the
  authority; the copy is written right after it).

A checkpoint is written every ``checkpoint_every_steps`` batches and/or every
``checkpoint_every_seconds`` of wall time, and always at the end of every epoch, including
the last. A rerun restores it, asks ``make_dataset(epoch)`` for the interrupted epoch's
dataset (which must yield the same batches in the same order for the same epoch) and skips
the batches already done, so no epoch starts again from scratch and the resumed run sees the
batches the uninterrupted run would have seen. A finished run reruns as a no-op; a larger
``epochs`` continues a finished run.

Why not ``keras.callbacks.BackupAndRestore(save_freq=N)``: in Keras 3 it restores the epoch
number only and restarts that epoch from its first batch (its saved batch index is not
used), and it writes its weights file in place, so a kill during the write can leave a
truncated backup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from config import ConfigError
from worldmodels import storage

CHECKPOINT_NAME = "checkpoint.npz"
STATE_NAME = "training_state.json"
_GROUPS = ("model", "optimizer", "metrics")


# --------------------------------------------------------------------------- atomic model files


def atomic_save_model(model, path: str | os.PathLike) -> Path:
    """Save ``model`` to ``path`` (``.keras`` whole model or ``.weights.h5`` weights) atomically.

    Keras needs the real suffix, so the temporary file is ``.<name>.<pid>.tmp<suffix>`` in
    the same folder; :func:`remove_stale_model_temporaries` deletes one left by a crash.

    The file holds the model's weights without the optimizer's state: Keras 3 would save a compiled
    model's Adam moments with it (two more copies of every weight, V's file 52 MB instead of 17 MB),
    yet every reader loads these files with ``compile=False`` and a resumed training restores its
    optimizer from :func:`save_checkpoint`'s ``checkpoint.npz``, never from here. Smaller files make
    the carries of ``checkpoints/`` and the shipped agents smaller.
    """
    path = Path(path)
    if path.name.endswith(".weights.h5"):
        suffix, save = ".weights.h5", model.save_weights
    elif path.suffix == ".keras":
        suffix, save = ".keras", model.save
    else:
        raise ValueError(f"{path}: expected a .keras or .weights.h5 file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp{suffix}"
    # Detach the optimizer while saving (Keras saves what the model's attributes track) and always
    # put it back: a training that saves mid-run goes on with the same optimizer object.
    optimizer = getattr(model, "optimizer", None)
    try:
        if optimizer is not None:
            model.optimizer = None
        try:
            save(tmp)
        finally:
            if optimizer is not None:
                model.optimizer = optimizer
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def remove_stale_model_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files of :func:`atomic_save_model` and ``storage.atomic_write`` left by a killed run."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = storage.remove_stale_temporaries(folder)
    for tmp in list(folder.glob(".*.tmp.keras")) + list(folder.glob(".*.tmp.weights.h5")):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


# --------------------------------------------------------------------------- checkpoints


def _variables(model) -> dict[str, list]:
    """The variables a checkpoint holds, by group, in a stable order."""
    return {
        "model": list(model.variables),
        "optimizer": list(model.optimizer.variables),
        "metrics": [v for metric in model.metrics for v in metric.variables],
    }


def save_checkpoint(model, checkpoint_dir: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``checkpoint.npz`` (all variables + ``state``) atomically, then ``training_state.json``."""
    checkpoint_dir = Path(checkpoint_dir)
    arrays: dict[str, np.ndarray] = {}
    layout = {}
    for group, variables in _variables(model).items():
        layout[group] = [v.path for v in variables]
        for i, v in enumerate(variables):
            arrays[f"{group}/{i:05d}"] = np.asarray(v.numpy())
    text = json.dumps({"state": dict(state), "layout": layout}, sort_keys=True)
    arrays["state"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    # Uncompressed: weights do not compress, and a checkpoint must be quick to write.
    path = storage.atomic_write(checkpoint_dir / CHECKPOINT_NAME, lambda f: np.savez(f, **arrays))
    storage.atomic_write_json(checkpoint_dir / STATE_NAME, dict(state))
    return path


def load_state(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The training state stored in ``checkpoint.npz`` (``None`` if there is none), without loading weights.

    Keys: ``epoch`` (epochs completed, i.e. the 0-based epoch in progress), ``step`` (batches
    done in that epoch), ``steps_per_epoch``, ``epochs``, ``iterations`` (optimizer updates
    in total), ``history`` (one dict of logs per finished epoch), ``sessions`` (where each
    run started and how many steps it trained), ``epoch_end_pending``, ``fingerprint``.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return _read_checkpoint(path)[0]


def _read_checkpoint(path: Path, groups: Mapping[str, list] | None = None):
    """``(state, values)`` of a checkpoint; ``values[group]`` are arrays for ``groups``' variables."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["state"].tobytes().decode("utf-8"))
            values = {}
            for group, variables in (groups or {}).items():
                saved = meta["layout"].get(group, [])
                if len(saved) != len(variables):
                    raise ConfigError(
                        f"{path} holds {len(saved)} {group} variables but this model has {len(variables)}: it "
                        f"was made by a different model or optimizer; delete {path.parent} to start over"
                    )
                values[group] = [z[f"{group}/{i:05d}"] for i in range(len(saved))]
                for variable, value, name in zip(variables, values[group], saved):
                    if tuple(variable.shape) != value.shape:
                        raise ConfigError(
                            f"{path}: {group} variable {name} has shape {value.shape} but this model's "
                            f"{variable.path} has {tuple(variable.shape)}; delete {path.parent} to start over"
                        )
            return meta["state"], values
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise storage.CorruptFileError(
            f"{path}: cannot read the training checkpoint ({type(exc).__name__}: {exc}); delete it to start over"
        ) from exc


def load_checkpoint(model, checkpoint_dir: str | os.PathLike) -> dict | None:
    """Restore model, optimizer and metric variables from ``checkpoint.npz``; return its state (or ``None``).

    The optimizer must be built first (:func:`train` does it). A checkpoint of a different
    model (other variable count or shapes) is a :class:`ConfigError` naming the first mismatch;
    nothing is assigned unless every variable matches.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    groups = _variables(model)
    state, values = _read_checkpoint(path, groups)
    for group, variables in groups.items():
        for variable, value in zip(variables, values[group]):
            variable.assign(value)
    return state


# --------------------------------------------------------------------------- the loop


def summary_writers(folder: str | os.PathLike) -> dict:
    """TensorBoard writers ``{"train", "heldout"}`` into ``folder/logs/train`` and ``folder/logs/heldout``.

    One run's two curves then share their names (``loss``, ``kl``, ...) and TensorBoard draws
    train and held-out on the same chart.
    """
    return {split: tf.summary.create_file_writer(str(Path(folder) / "logs" / split)) for split in ("train", "heldout")}


def log_epoch(writers: Mapping, step: int, train_logs: Mapping, heldout_logs: Mapping,
              extra_train: Mapping | None = None) -> None:
    """Write one epoch's scalars at ``step`` and flush.

    ``train_logs`` are Keras' epoch logs (the ``epoch`` key is skipped); ``heldout_logs`` have
    ``heldout_<name>`` keys (as ``on_epoch_end`` returns them) and are written as ``<name>`` to
    the held-out writer; ``extra_train`` (e.g. the learning rate) goes to the train writer.
    """
    with writers["train"].as_default(step=step):
        for name, value in {**train_logs, **(extra_train or {})}.items():
            if name != "epoch":
                tf.summary.scalar(name, value)
    with writers["heldout"].as_default(step=step):
        for name, value in heldout_logs.items():
            tf.summary.scalar(name.removeprefix("heldout_"), value)
    for writer in writers.values():
        writer.flush()


def _json_roundtrip(obj):
    return json.loads(json.dumps(obj, sort_keys=True))


def _float_logs(logs) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()}


def train(
    model,
    make_dataset: Callable[[int], tf.data.Dataset],
    steps_per_epoch: int,
    epochs: int,
    checkpoint_dir: str | os.PathLike,
    *,
    on_epoch_end: Callable[[int, dict[str, float]], Mapping[str, float] | None] | None = None,
    checkpoint_every_steps: int | None = None,
    checkpoint_every_seconds: float | None = 60.0,
    fingerprint: Mapping[str, Any] | None = None,
    samples_per_step: int | None = None,
    desc: str = "train",
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``model`` for ``epochs`` epochs, resuming from ``checkpoint_dir`` if a checkpoint is there.

    Args:
        model: a compiled Keras model (its ``train_step`` defines the update); build and
            compile it inside ``tf.distribute`` strategy scope to train on several devices.
        make_dataset: ``epoch -> tf.data.Dataset`` of batches for that epoch (0-based). It must
            give the same batches in the same order every time it is called with the same
            epoch: that is what makes skipping the finished batches exact. Only the first
            ``steps_per_epoch`` batches are used.
        steps_per_epoch: batches per epoch.
        epochs: total number of epochs of the run (not "more epochs").
        checkpoint_dir: folder of ``checkpoint.npz`` and ``training_state.json``.
        on_epoch_end: ``(epoch, train_logs) -> extra_logs`` called after each epoch, e.g. to
            evaluate on held-out data and write TensorBoard summaries; ``extra_logs`` are
            merged into the history. It runs after the end-of-epoch checkpoint; if the run is
            killed during it, the rerun calls it again for that epoch before going on.
        checkpoint_every_steps, checkpoint_every_seconds: checkpoint mid-epoch when either
            this many batches or this much wall time passed since the last checkpoint
            (``None`` disables that trigger).
        fingerprint: JSON-able description of what makes a resume valid (data files, batch
            size, seeds...); a checkpoint with a different fingerprint is refused.
        samples_per_step: batch size, only for the frames/s shown by the progress bar.
        desc: progress bar label.
        log: where one-line status messages go.

    Returns:
        The final state (see :func:`load_state`); ``state["history"][e]`` holds epoch ``e``'s
        train logs (running means of the model's metrics over the epoch) and the extra logs.

    Raises:
        ConfigError: the checkpoint belongs to another model, data set or ``steps_per_epoch``.
        ValueError: bad arguments, or a dataset with fewer than ``steps_per_epoch`` batches.
    """
    _check_arguments(model, steps_per_epoch, epochs, checkpoint_every_steps)
    checkpoint_dir = Path(checkpoint_dir)
    state = _restore(model, checkpoint_dir, _json_roundtrip(dict(fingerprint or {})), steps_per_epoch, epochs)
    run = _Run(model, make_dataset, steps_per_epoch, epochs, checkpoint_dir, on_epoch_end, checkpoint_every_steps,
               checkpoint_every_seconds, samples_per_step, desc, state)

    if state["epoch_end_pending"] is not None:
        log(f"finishing the end of epoch {state['epoch_end_pending'] + 1} (interrupted after its checkpoint)")
        run.finish_epoch(state["epoch_end_pending"])
    if state["epoch"] >= epochs:
        log(f"training is complete: {state['epoch']} of {epochs} epochs done ({checkpoint_dir / CHECKPOINT_NAME})")
        return state

    _start_session(run, log)
    model.make_train_function()
    run.last_save_time, run.last_save_step = time.monotonic(), state["step"]
    for epoch in range(state["epoch"], epochs):
        logs = _train_epoch(run, epoch)
        state["history"].append({"epoch": epoch + 1, **_float_logs(logs)})
        state.update(epoch=epoch + 1, step=0, epoch_end_pending=epoch)
        run.save()
        run.last_save_time, run.last_save_step = time.monotonic(), 0
        run.finish_epoch(epoch)
        log(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v:.5g}" for k, v in state["history"][epoch].items()
                                                       if k != "epoch"))
    return state


def _check_arguments(model, steps_per_epoch, epochs, checkpoint_every_steps) -> None:
    for name, value in (("steps_per_epoch", steps_per_epoch), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if checkpoint_every_steps is not None and checkpoint_every_steps < 1:
        raise ValueError(f"checkpoint_every_steps must be >= 1 or None, got {checkpoint_every_steps}")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("train() needs a compiled model: call model.compile(optimizer=...) first")


def _restore(model, checkpoint_dir: Path, fingerprint: dict, steps_per_epoch: int, epochs: int) -> dict:
    """The training state of ``checkpoint_dir`` with the model's variables restored, or a fresh one."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_model_temporaries(checkpoint_dir)
    # Optimizer variables (Adam's moments) exist only once the optimizer is built; build them
    # before loading so that they are restored rather than created fresh on the first step.
    with model.distribute_strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    state = load_checkpoint(model, checkpoint_dir)
    if state is None:
        state = {"epoch": 0, "step": 0, "iterations": 0, "steps_per_epoch": int(steps_per_epoch),
                 "epochs": int(epochs), "history": [], "sessions": [], "epoch_end_pending": None,
                 "fingerprint": fingerprint}
    else:
        _check_resumable(state, fingerprint, steps_per_epoch, checkpoint_dir)
    state["epochs"] = int(epochs)
    return state


@dataclasses.dataclass
class _Run:
    """One session of :func:`train`: its arguments, the state it advances and when it last saved."""

    model: Any
    make_dataset: Callable[[int], tf.data.Dataset]
    steps_per_epoch: int
    epochs: int
    checkpoint_dir: Path
    on_epoch_end: Callable | None
    checkpoint_every_steps: int | None
    checkpoint_every_seconds: float | None
    samples_per_step: int | None
    desc: str
    state: dict
    session: dict = dataclasses.field(default_factory=dict)
    last_save_time: float = 0.0
    last_save_step: int = 0

    def save(self) -> None:
        self.state["iterations"] = int(self.model.optimizer.iterations.numpy())
        save_checkpoint(self.model, self.checkpoint_dir, self.state)

    def finish_epoch(self, epoch: int) -> None:
        extra = self.on_epoch_end(epoch, dict(self.state["history"][epoch])) if self.on_epoch_end else None
        self.state["history"][epoch].update(_float_logs(extra or {}))
        self.state["epoch_end_pending"] = None
        self.save()

    def checkpoint_due(self) -> bool:
        """A mid-epoch checkpoint is due (the last step of an epoch is saved with the epoch marked done)."""
        steps_due = self.checkpoint_every_steps is not None \
            and self.state["step"] - self.last_save_step >= self.checkpoint_every_steps
        time_due = self.checkpoint_every_seconds is not None \
            and time.monotonic() - self.last_save_time >= self.checkpoint_every_seconds
        return (steps_due or time_due) and self.state["step"] < self.steps_per_epoch


def _start_session(run: _Run, log: Callable[[str], None]) -> None:
    """Record where this session starts (``state["sessions"]``) and say whether it starts or resumes."""
    state = run.state
    run.session = {"start_epoch": state["epoch"], "start_step": state["step"],
                   "start_iterations": int(run.model.optimizer.iterations.numpy()), "steps_trained": 0,
                   "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    state["sessions"].append(run.session)
    if state["step"] or state["epoch"]:
        log(f"resuming at epoch {state['epoch'] + 1}/{run.epochs}, step {state['step']}/{run.steps_per_epoch} "
            f"from {run.checkpoint_dir / CHECKPOINT_NAME}")
    else:
        log(f"starting: {run.epochs} epoch(s) of {run.steps_per_epoch} steps; checkpoints in {run.checkpoint_dir}")


def _epoch_iterator(run: _Run, epoch: int):
    """An iterator over the batches of ``epoch`` still to train (those before ``state["step"]`` skipped)."""
    dataset = run.make_dataset(epoch)
    if not isinstance(dataset, tf.data.Dataset):
        raise ValueError(f"make_dataset must return a tf.data.Dataset, got {type(dataset).__name__}")
    # tf.data skips without handing the batches to Python: reading them costs far less
    # than training on them, and it reproduces the shuffle state exactly.
    dataset = dataset.skip(run.state["step"]).take(run.steps_per_epoch - run.state["step"])
    strategy = run.model.distribute_strategy
    if strategy.num_replicas_in_sync > 1:
        dataset = strategy.experimental_distribute_dataset(dataset)
    return iter(dataset)


def _train_epoch(run: _Run, epoch: int) -> dict:
    """Train the rest of ``epoch``, checkpointing mid-epoch when due; the epoch's last train logs."""
    state, model = run.state, run.model
    if state["step"] == 0:
        # A resumed epoch keeps the running means restored from the checkpoint.
        model.reset_metrics()
    iterator = _epoch_iterator(run, epoch)
    logs = {}
    start, start_step = time.monotonic(), state["step"]
    with tqdm(total=run.steps_per_epoch, initial=state["step"], desc=f"{run.desc} epoch {epoch + 1}/{run.epochs}",
              unit="batch", dynamic_ncols=True, mininterval=1.0) as bar:
        while state["step"] < run.steps_per_epoch:
            try:
                logs = model.train_function(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise ValueError(
                    f"the dataset of epoch {epoch} ended after {state['step']} batches, but "
                    f"steps_per_epoch is {run.steps_per_epoch}"
                ) from None
            except Exception as exc:
                # Name the step in the one-line report of worldmodels.cli.
                exc.add_note(f"{run.desc} training, epoch {epoch + 1}, step {state['step'] + 1}")
                raise
            state["step"] += 1
            run.session["steps_trained"] += 1
            bar.update(1)
            if bar.n % 10 == 0 or state["step"] == run.steps_per_epoch:
                # Reading the loss waits for the device, so do it only now and then.
                postfix = {k: f"{v:.4g}" for k, v in _float_logs(logs).items()}
                if run.samples_per_step:
                    rate = (state["step"] - start_step) * run.samples_per_step / max(time.monotonic() - start, 1e-9)
                    postfix["frames/s"] = f"{rate:.0f}"
                bar.set_postfix(postfix, refresh=False)
            if run.checkpoint_due():
                run.save()
                run.last_save_time, run.last_save_step = time.monotonic(), state["step"]
    return logs


def _check_resumable(state, fingerprint, steps_per_epoch, checkpoint_dir):
    where = checkpoint_dir / CHECKPOINT_NAME
    if state.get("fingerprint") != fingerprint:
        saved = state.get("fingerprint") or {}
        diffs = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ConfigError(
            f"{where} was made with other data or settings ({', '.join(diffs)} differ), so training "
            f"cannot resume from it exactly; restore them, or delete {checkpoint_dir} to start over"
        )
    if state["steps_per_epoch"] != steps_per_epoch:
        raise ConfigError(
            f"{where} has {state['steps_per_epoch']} steps per epoch, now there are {steps_per_epoch}; "
            f"restore the data, or delete {checkpoint_dir} to start over"
        )
