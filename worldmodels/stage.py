"""What the two network-training stages (V in ``vision_training``, M in ``rnn_training``) share.

Both read a folder of episodes made by an earlier stage, refuse one made with an incompatible
config, split it into training and held-out episodes, and train resumably into an output folder
whose ``metrics.json`` (written last) marks the stage complete. This module holds those steps
once; TensorFlow is not imported here, so a finished run or a missing folder is reported at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import config
from worldmodels import artifacts, datasets, storage


def check_saved_config(folder: Path, cfg: config.Config, keys, *, required_hint: str | None = None,
                       log: Callable[[str], None] | None = None) -> None:
    """Refuse ``folder`` if its ``config.json`` differs from ``cfg`` in ``keys``.

    A missing ``config.json`` is an error naming ``required_hint`` when one is given, a note
    through ``log`` when one is given (an input whose settings cannot be checked), and nothing
    otherwise (an output folder not made yet).
    """
    saved = Path(folder) / artifacts.CONFIG_FILE
    if saved.is_file():
        config.check_compatible(config.load_config(saved), cfg, keys, str(folder))
    elif required_hint is not None:
        raise storage.MissingDataError(f"{saved} is missing, so the settings that made {folder} are unknown. "
                                       f"{required_hint}")
    elif log is not None:
        log(f"note: {saved} is missing, so its settings cannot be checked")


def finished_metrics(out: Path, files, count_key: str, needed: int, prints: dict, what: str,
                     log: Callable[[str], None] = print) -> dict | None:
    """``metrics.json`` of a finished run in ``out`` (``None`` if the run must still train).

    A run is finished when ``metrics.json`` and every one of ``files`` exist and the metrics
    record at least ``needed`` of ``count_key`` (epochs for V, steps for M). A finished run
    made from other data or settings (another ``prints``) is kept, with a note saying how to
    train it again.
    """
    metrics_path = out / artifacts.METRICS_FILE
    if not metrics_path.is_file() or not all(Path(f).is_file() for f in files):
        return None
    done = storage.read_json(metrics_path)
    if done.get(count_key, 0) < needed:
        return None
    if done.get("fingerprint") != prints:
        log(f"note: {what} in {out} was trained on other data or settings than the current ones; "
            f"delete {out} to train it again")
    return done


def prepare_output(out: Path, cfg: config.Config, heldout_fraction: float, train_paths, heldout_paths) -> None:
    """Create ``out`` with ``config.json`` and ``split.json`` (the split uses V's ``vae.split_seed``)."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, out)
    datasets.save_split(out, heldout_fraction, cfg.vae.split_seed, train_paths, heldout_paths)


def fit(model, make_dataset, steps_per_epoch: int, epochs: int, out: Path, *, on_epoch_end, checkpoint_every,
        prints: dict, samples_per_step: int, desc: str, log: Callable[[str], None]) -> dict:
    """``training.train`` into ``out/checkpoint`` with a corrupt episode file reported as such; the final state."""
    from worldmodels import training

    with datasets.surface_corrupt_files():
        return training.train(model, make_dataset, steps_per_epoch, epochs, out / "checkpoint",
                              on_epoch_end=on_epoch_end, checkpoint_every_steps=checkpoint_every,
                              fingerprint=prints, samples_per_step=samples_per_step, desc=desc, log=log)


def tagged(tag: str) -> Callable[[str], None]:
    """A ``log`` that prints ``[tag] message`` at once (progress of a stage between tqdm bars)."""
    return lambda message: print(f"[{tag}] {message}", flush=True)


def _positive_steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of steps, got {text!r}")
    return value


def add_checkpoint_every(parser: argparse.ArgumentParser) -> None:
    """The ``--checkpoint-every STEPS`` option of the training scripts (``args.checkpoint_every``, None by default)."""
    parser.add_argument("--checkpoint-every", type=_positive_steps, default=None, metavar="STEPS",
                        help="also checkpoint every STEPS batches (default: every 60 s and at every epoch end)")
