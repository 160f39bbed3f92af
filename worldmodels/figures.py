"""Result figures and the results table, made from the pipeline's outputs only.

    python -m worldmodels.figures reconstructions --data-dir data --out results/reconstructions.png
    python -m worldmodels.figures all --data-dir data --out-dir results/

Each figure function reads only what the pipeline wrote under ``data_dir``, saves one small
PNG (or GIF) atomically and returns its path. A missing input is a
:class:`~worldmodels.storage.MissingDataError` whose one-line message names the command that
makes it; :func:`make_all` makes every figure whose inputs exist and says why it skipped the
others. ``notebooks/results.ipynb`` shows them with :func:`results_table`.

=================  ============================================  ===============================
name               inputs under ``data_dir``                     made by
=================  ============================================  ===============================
reconstructions    ``vae/`` and/or ``vae_gan/``, ``rollouts/``   02_train_vae.py
dream_strip        ``rnn/`` (with ``split.json``), V, rollouts   04_train_rnn.py
learning_curve     ``controller*/history.csv``, ``eval.csv``     05_train_controller.py / study
temperature        ``temperature_study/results.json``            study_temperature.py
driving            a ``controller*/controller.npz``, V and M     05_train_controller.py
=================  ============================================  ===============================

``python -m worldmodels.figures architecture --out results/architecture.png`` draws README's
diagram of the agent, which needs no data. ``python -m worldmodels.figures sample_efficiency --data-dir data
--out results/sample_efficiency.png`` draws the held-out real score of every controller (stage 5 in the real
env and in the dream, the hybrid, the iterations) against the real environment steps behind it
(:func:`sample_efficiency`; every real step counts, stage 1's data included). ``python -m worldmodels.figures
profile --evaluation FILE.json --out results/profile.png`` draws how a controller drove (:func:`profile_figure`)
from a results file of ``evaluate_controller.py --profile``. Two markdown tables for a README:
``search_table --search DIR --cores N`` (a search's held-out evaluations with their cost,
``controller_training.search_table``) and ``iterations_table --data-dir data`` (``06_iterate.py``'s
``iterations.csv``, :func:`iterations_table`).

Figures are drawn on a bare :class:`matplotlib.figure.Figure` (no pyplot), so importing this
module never changes the backend of a notebook that uses it.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import config
from worldmodels import artifacts, datasets, metrics, sequences, storage

NOT_RUN = "not run"
# The file each figure of make_all is written to, in the order they are made.
FILE_NAMES = {
    "reconstructions": "reconstructions.png",
    "dream_strip": "dream_strip.png",
    "learning_curve": "learning_curve.png",
    "temperature": "temperature.png",
    "driving": "driving.gif",
}
_DREAM_DIR = re.compile(rf"^{artifacts.DREAM_CONTROLLER_PREFIX}(.+)$")


def architecture_figure(data_dir: Path | None, out: Path) -> Path:
    """A diagram of the agent: V, M and C around the real environment, and M's dream in its place.

    Needs no data (``data_dir`` is ignored; it keeps the signature of the other figures).
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig = Figure(figsize=(9.0, 4.0))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4.9)
    ax.axis("off")
    boxes = {  # name: (x, y, width, height, colour, label)
        "env": (0.3, 2.9, 2.0, 1.2, "#dddddd", "CarRacing-v3\n(or M's dream)"),
        "V": (3.1, 2.9, 1.9, 1.2, "#9ecae1", "V: ConvVAE\n64x64x3 -> z (32)"),
        "C": (5.9, 2.9, 2.4, 1.2, "#fdae6b", "C: a = tanh(W [z h] + b)\n867 parameters"),
        "M": (5.9, 0.6, 2.4, 1.3, "#a1d99b", "M: MDN-RNN\nLSTM 256, 5 Gaussians\n+ reward and done heads"),
    }
    for x, y, w, h, colour, label in boxes.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", facecolor=colour, edgecolor="black"))
        ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=9)

    def arrow(start, end, text="", at=None, dashed=False, rad=0.0):
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=14, linewidth=1.4,
                                     linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}"))
        if text:
            x, y = at if at else ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12)
            ax.text(x, y, text, ha="center", va="bottom", fontsize=9)

    arrow((2.4, 3.5), (3.0, 3.5), "frame", at=(2.7, 3.65))
    arrow((5.1, 3.5), (5.8, 3.5), "z_t", at=(5.45, 3.65))
    arrow((4.6, 2.8), (5.8, 1.5), "z_t", at=(5.0, 2.0))
    arrow((7.1, 2.0), (7.1, 2.8), "h_t", at=(7.35, 2.3))
    arrow((8.4, 3.5), (9.3, 3.5), "a_t", at=(8.85, 3.65))
    arrow((9.6, 3.3), (8.4, 1.3), "a_t", at=(9.35, 2.2))
    arrow((9.7, 4.0), (1.3, 4.2), "real: the action drives the car, the game renders the next frame",
          at=(5.5, 4.6), rad=0.06)
    arrow((5.8, 1.0), (1.3, 2.8), "dream: z_t+1 ~ P(z | a_t, z_t, h_t) at temperature tau,\n"
          "plus M's predicted reward and done", at=(2.9, 0.15), dashed=True, rad=-0.25)
    ax.text(9.7, 3.5, "action", ha="left", va="center", fontsize=9)
    return storage.save_figure(fig, out, dpi=90)


def _image_grid(rows: list[np.ndarray], labels: list[str], titles: list[str] | None = None) -> Figure:
    """A grid of frames: ``rows`` each (N, 64, 64, 3) floats in [0, 1], one label per row."""
    count = len(rows[0])
    fig = Figure(figsize=(1.3 * count + 0.6, 1.35 * len(rows) + (0.2 if titles else 0)))
    axes = fig.subplots(len(rows), count, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(count):
            axes[i, j].imshow(np.clip(row[j], 0.0, 1.0))
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if titles and i == 0:
                axes[i, j].set_title(titles[j], fontsize=8)
        axes[i, 0].set_ylabel(labels[i], fontsize=8)
    return fig


# --------------------------------------------------------------------------- V


def heldout_frames(data_dir: Path, cfg: config.Config, count: int = metrics.GRID_FRAMES) -> np.ndarray:
    """``count`` frames spread over the first held-out episode (V's split), uint8 (count, 64, 64, 3)."""
    paths = storage.list_episodes(artifacts.rollouts_dir(data_dir), artifacts.ROLLOUTS)
    train, heldout = datasets.split_episodes(paths, cfg.vae.heldout_fraction, cfg.vae.split_seed)
    return metrics.grid_frames(heldout or train, count)


def reconstruction_grid(models: Mapping[str, object], frames: np.ndarray, out: Path) -> Path:
    """``frames`` (top row, uint8) and each V's posterior-mean reconstructions below, labelled with their MSE.

    ``models`` maps a row label to a V (with ``encode``/``decode``); used by README's figure and by
    ``vae_gan.compare``.
    """
    rows, labels = [frames.astype(np.float32) / 255.0], ["held-out frame"]
    for name, vision in models.items():
        recon = vision.decode(vision.encode(frames)[0])
        rows.append(recon)
        labels.append(f"{name}\nMSE {float(np.mean((recon - rows[0]) ** 2)):.5f}")
    return storage.save_figure(_image_grid(rows, labels), out)


def reconstruction_figure(data_dir: Path, out: Path, count: int = metrics.GRID_FRAMES) -> Path:
    """Held-out frames (top row) and their reconstructions by every trained V (VAE, VAE-GAN) below."""
    data_dir = Path(data_dir)
    models, frames = {}, None
    for model_name in artifacts.VISION:
        folder = data_dir / artifacts.VISION[model_name][0]
        if not (folder / artifacts.CONFIG_FILE).exists():
            continue
        cfg = config.load_config(folder / artifacts.CONFIG_FILE)
        if frames is None:
            frames = heldout_frames(data_dir, cfg, count)
        models[model_name] = artifacts.load_vision(data_dir, cfg)
    if frames is None:
        raise storage.MissingDataError(f"no trained V under {data_dir} (run 02_train_vae.py)")
    return reconstruction_grid(models, frames, out)


# --------------------------------------------------------------------------- M


def dream_open_loop(model, z0, actions, temperature: float, seed: int = 0, prefix=None):
    """M in open loop from ``z0`` (Z,) under ``actions`` (T, 3): its sampled z_{t+1} is its next input.

    ``prefix``: ``(mu (S, Z), actions (S, 3))`` of the real frames before ``z0``, which M reads
    first to reach the state it has at that frame (as the dream does,
    :func:`worldmodels.dream.read_prefix`); None starts from M's zero state, which is right only
    at an episode's first frame. Step k draws with the stateless seed ``(seed, k)``, so a dream
    is reproducible and two temperatures with the same seed differ only by the temperature.
    Returns the dreamed z (T, Z), M's predicted reward (T,) and done probability (T,) (NaN
    without those heads).
    """
    import tensorflow as tf

    from models.mdn_rnn import sample_mixture
    from worldmodels.dream import read_prefix

    z, state = np.asarray(z0, np.float32)[None], model.initial_state(1)
    if prefix is not None and len(prefix[0]):
        state = read_prefix(model, np.asarray(prefix[0])[None], np.asarray(prefix[1])[None], [len(prefix[0])])
    zs, rewards, dones = [], [], []
    for k, action in enumerate(np.asarray(actions, np.float32)):
        out = model.step(z, action[None], state)
        z = sample_mixture(out["log_pi"], out["mu"], out["log_sigma"], temperature,
                           seed=tf.constant([seed, k], tf.int64)).numpy()
        state = out["state"]
        zs.append(z[0])
        rewards.append(float(out["reward"][0]) if "reward" in out else np.nan)
        dones.append(float(out["done_prob"][0]) if "done_prob" in out else np.nan)
    return np.stack(zs), np.array(rewards), np.array(dones)


def dream_strip_figure(data_dir: Path, out: Path, temperatures=(0.5, 1.15), steps: int = 8, skip: int | None = None,
                       every: int = 10) -> Path:
    """M's open-loop dream from a real held-out frame under the recorded actions, decoded by V.

    Takes the first held-out episode of M's split (``rnn/split.json``), encodes frame ``skip``
    (default ``dream.skip_initial_frames``: after CarRacing's zoom-in) and dreams with M at each
    temperature. Columns are ``steps`` frames ``every`` steps apart (cut to the episode's
    length); rows: the real frames, V's reconstructions of them, one dream per temperature.
    """
    data_dir = Path(data_dir)
    if steps < 1 or every < 1 or not temperatures:
        raise ValueError(f"need steps >= 1, every >= 1 and at least one temperature; got steps={steps}, "
                         f"every={every}, temperatures={temperatures!r}")
    rnn_dir = data_dir / artifacts.RNN[0]
    if not (rnn_dir / artifacts.CONFIG_FILE).exists() or not (rnn_dir / artifacts.SPLIT_FILE).exists():
        raise storage.MissingDataError(f"no trained M under {rnn_dir} (run 04_train_rnn.py)")
    cfg = config.load_config(rnn_dir / artifacts.CONFIG_FILE)
    split = storage.read_json(rnn_dir / artifacts.SPLIT_FILE)
    names = split.get("heldout") or split.get("train")
    if not names:
        raise storage.CorruptFileError(f"{rnn_dir / 'split.json'} names no episode; rerun 04_train_rnn.py")
    episode = storage.load_episode(data_dir / artifacts.ROLLOUTS / names[0], keys=("obs", "action"))
    length = len(episode["obs"])
    if length < 2:
        raise storage.CorruptFileError(f"{names[0]} has {length} frame(s): nothing to dream from")
    skip = cfg.dream.skip_initial_frames if skip is None else int(skip)
    start = max(0, min(skip, length - 2))  # leave at least one step to dream in a short episode
    horizon = min(steps * every, length - 1 - start)
    columns = np.unique(np.clip(every * np.arange(1, steps + 1), 1, horizon))

    vision = artifacts.load_vision(data_dir, cfg)
    model = artifacts.load_rnn(data_dir, cfg)
    real = episode["obs"][start + columns].astype(np.float32) / 255.0
    mu = vision.encode(episode["obs"][:start + 1])[0]  # frames 0..start: M reads 0..start-1 first
    rows = [real, vision.decode(vision.encode(episode["obs"][start + columns])[0])]
    labels = ["real", "V(real)"]
    for tau in temperatures:
        zs, _, _ = dream_open_loop(model, mu[start], episode["action"][start:start + horizon], float(tau),
                                   prefix=(mu[:start], episode["action"][:start]))
        rows.append(vision.decode(zs[columns - 1]))
        labels.append(f"dream\ntau={tau:g}")
    fig = _image_grid(rows, labels, [f"t+{c}" for c in columns])
    fig.suptitle(f"M dreaming in open loop from frame {start} of held-out {names[0]} under its recorded actions",
                 fontsize=8)
    return storage.save_figure(fig, out)


# --------------------------------------------------------------------------- C


def _read_rows(path: Path) -> list[dict[str, float]]:
    """A numeric CSV (history.csv, eval.csv) as a list of {column: float}; damaged: CorruptFileError."""
    try:
        with open(path, newline="") as f:
            return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]
    except (TypeError, ValueError) as exc:
        raise storage.CorruptFileError(f"{path} is not a valid numeric CSV ({exc})") from exc


def dream_controller_dirs(data_dir: Path) -> list[tuple[float, Path]]:
    """``[(tau, <data>/controller_dream_t<tau>)]`` for every dream-trained controller folder, by tau."""
    found = []
    for folder in Path(data_dir).glob(f"{artifacts.DREAM_CONTROLLER_PREFIX}*"):
        match = _DREAM_DIR.match(folder.name)
        try:
            tau = float(match.group(1))
        except (AttributeError, ValueError):
            continue  # e.g. controller_dream_tfoo: not a folder the pipeline made
        if folder.is_dir():
            found.append((tau, folder))
    return sorted(found)


def learning_curve_figure(data_dir: Path, out: Path) -> Path:
    """CMA-ES learning curves of every controller search under ``data_dir``.

    Left, ``controller/`` (trained in the real CarRacing): best member and population mean per
    generation on the training tracks, and the CMA mean on the held-out tracks (mean +- std).
    Right, every ``controller_dream_t<tau>/``: the population mean of the dream fitness (dashed)
    and the CMA mean's score on the held-out *real* tracks (markers, +- std), one colour per tau.
    A search without ``history.csv`` is left out; at least one must exist.
    """
    data_dir = Path(data_dir)
    real = data_dir / artifacts.CONTROLLER
    real_history = _read_rows(real / "history.csv") if (real / "history.csv").exists() else []
    dreams = [(tau, folder, _read_rows(folder / "history.csv")) for tau, folder in dream_controller_dirs(data_dir)
              if (folder / "history.csv").exists()]
    dreams = [(tau, folder, rows) for tau, folder, rows in dreams if rows]
    if not real_history and not dreams:
        raise storage.MissingDataError(f"no controller search under {data_dir} (run 05_train_controller.py, or "
                                       "study_temperature.py for the dream)")
    panels = int(bool(real_history)) + int(bool(dreams))
    fig = Figure(figsize=(5.5 * panels, 3.6))
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if real_history:
        ax = axes.pop(0)
        g = [row["generation"] for row in real_history]
        ax.plot(g, [row["best"] for row in real_history], ".-", label="best member (training tracks)")
        ax.plot(g, [row["mean"] for row in real_history], ".-", label="population mean (training tracks)")
        evals = _read_rows(real / "eval.csv") if (real / "eval.csv").exists() else []
        if evals:
            ax.errorbar([e["generation"] for e in evals], [e["mean"] for e in evals], yerr=[e["std"] for e in evals],
                        fmt="o-", capsize=3, label="CMA mean, held-out tracks (+- std)")
        ax.set_title("C trained in the real CarRacing-v3", fontsize=9)
    if dreams:
        ax = axes.pop(0)
        colours = [f"C{i % 10}" for i in range(len(dreams))]
        for colour, (tau, folder, history) in zip(colours, dreams):
            ax.plot([row["generation"] for row in history], [row["mean"] for row in history], ".--", color=colour,
                    label=f"tau={tau:g}: population mean in the dream")
            evals = _read_rows(folder / "eval.csv") if (folder / "eval.csv").exists() else []
            if evals:
                ax.errorbar([e["generation"] for e in evals], [e["mean"] for e in evals],
                            yerr=[e["std"] for e in evals], fmt="o-", color=colour, capsize=3,
                            label=f"tau={tau:g}: CMA mean, held-out real tracks")
        ax.set_title("C trained in M's dream", fontsize=9)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0)
        ax.set_xlabel("generation")
        ax.set_ylabel("return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return storage.save_figure(fig, out)


def temperature_plot(out: Path, rows: list[dict], real: dict | None = None) -> Path:
    """Score in the dream and in the real CarRacing (mean +- std) per tau of a study's ``rows``.

    ``real``, the controller trained in the real environment on the same tracks, is drawn as a
    line with its +- std band (``worldmodels.temperature_study``).
    """
    taus = [r["temperature"] for r in rows]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.errorbar(taus, [r["dream_mean"] for r in rows], yerr=[r["dream_std"] for r in rows], fmt="s--", capsize=4,
                label="score in the dream")
    ax.errorbar(taus, [r["real_mean"] for r in rows], yerr=[r["real_std"] for r in rows], fmt="o-", capsize=4,
                label="score in the real CarRacing-v3")
    if real is not None:
        ax.axhline(real["real_mean"], color="k", lw=1, label="trained in the real env (+- std)")
        ax.axhspan(real["real_mean"] - real["real_std"], real["real_mean"] + real["real_std"], color="k", alpha=0.08)
    ax.set_xlabel("temperature tau")
    ax.set_ylabel("return (mean +- std)")
    ax.set_title("C trained in M's dream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return storage.save_figure(fig, out, dpi=100)


def _seed_boxes(ax, positions, scores, jitter, colour, ms: float, alpha: float) -> None:
    """One box per search at ``positions``, its per-track ``scores`` as jittered points and its mean as a diamond."""
    ax.boxplot(scores, positions=positions, widths=0.5, showfliers=False)
    for x, s in zip(positions, scores):
        ax.plot(x + jitter.uniform(-0.15, 0.15, len(s)), s, ".", ms=ms, alpha=alpha, color=colour)
        ax.plot(x, s.mean(), "D", color="tab:red", ms=5)


def seed_plot(out: Path, rows: list[dict], across: dict, title: str = "") -> Path:
    """Per-track returns of one controller per CMA-ES seed on the same tracks (``worldmodels.seed_study``).

    ``rows``: one dict per seed with ``seed`` and ``scores`` (E,), the returns on the E shared
    tracks, drawn as a box and the tracks as jittered points (fixed jitter). ``across``: ``mean``
    and ``std`` (ddof 1, None for one seed) of the per-seed means, a line and a band.
    """
    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2.0), 3.8))
    ax = fig.subplots()
    scores = [np.asarray(r["scores"], np.float64) for r in rows]
    positions = np.arange(1, len(rows) + 1)
    _seed_boxes(ax, positions, scores, np.random.default_rng(0), "tab:blue", ms=4, alpha=0.6)
    ax.axhline(across["mean"], color="k", lw=1, label=f"mean over seeds {across['mean']:.1f}"
               + (f" +- {across['std']:.1f} (std of the seed means)" if across.get("std") is not None else ""))
    if across.get("std") is not None:
        ax.axhspan(across["mean"] - across["std"], across["mean"] + across["std"], color="k", alpha=0.08)
    ax.set_xticks(positions, [str(r["seed"]) for r in rows])
    ax.set_xlabel("controller seed (diamond: its mean over the tracks)")
    ax.set_ylabel(f"return on each of {len(scores[0])} held-out tracks")
    ax.set_title(title or "C per CMA-ES seed, the same held-out tracks", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return storage.save_figure(fig, out, dpi=100)


def seed_comparison_plot(out: Path, runs: dict[str, dict]) -> Path:
    """Several seed studies side by side (``seed_study table --figure``): one group of boxes per run.

    ``runs``: name -> a seed study's ``results.json`` (its ``rows`` with each seed's ``scores`` on the
    shared tracks, its ``across_seeds`` mean and std). Within a group a box per controller seed with
    its tracks as jittered points and its mean as a diamond; across the group a line at the mean of
    the seed means and a band of their std, so the spread between searches and the spread between
    tracks of one search are read on the same axis.
    """
    fig = Figure(figsize=(max(5.0, 1.0 * sum(len(r["rows"]) for r in runs.values()) + 2.0), 4.0))
    ax = fig.subplots()
    jitter = np.random.default_rng(0)
    x, ticks, labels = 1.0, [], []
    for i, (name, results) in enumerate(runs.items()):
        colour = f"C{i % 10}"  # matplotlib's colour cycle: any number of runs
        rows, across = results["rows"], results["across_seeds"]
        positions = x + np.arange(len(rows))
        _seed_boxes(ax, positions, [np.asarray(r["scores"], np.float64) for r in rows], jitter, colour, ms=3, alpha=0.5)
        left, right = positions[0] - 0.4, positions[-1] + 0.4
        label = f"{name}: {across['mean']:.1f}" + (f" +- {across['std']:.1f}" if across.get("std") is not None else "")
        ax.hlines(across["mean"], left, right, color=colour, lw=2, label=label + " (mean +- std of the seed means)")
        if across.get("std") is not None:
            ax.fill_between([left, right], across["mean"] - across["std"], across["mean"] + across["std"],
                            color=colour, alpha=0.12)
        ticks += list(positions)
        labels += [f"{name}\nseed {r['seed']}" for r in rows]
        x = positions[-1] + 2.0
    tracks = next(iter(runs.values()))["final_tracks"]
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_ylabel(f"return on each of {tracks['episodes']} held-out tracks")
    ax.set_title("C per CMA-ES seed on each V, the same held-out tracks (diamond: a seed's mean)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return storage.save_figure(fig, out, dpi=100)


def profile_figure(evaluation: Path, out: Path) -> Path:
    """How a controller drove, from an ``evaluate_controller.py --profile`` results file.

    Left: each track's return against the car's mean speed, coloured by the share of steps it
    spent off the road. Right: the share of the track's tiles visited (CarRacing-v3 ends a lap
    at 95% of them), the laps finished in 1000 steps counted in the title.
    """
    results = storage.read_json(evaluation)
    if "profile" not in results:
        raise storage.MissingDataError(f"{evaluation} has no profile: score with "
                                       "python evaluate_controller.py ... --profile --output FILE.json")
    tracks = results["profile"]["tracks_profile"]
    scores = np.asarray(results["scores"], np.float64)
    speed = np.array([t["mean_speed"] for t in tracks])
    off = np.array([t["off_road"] for t in tracks])
    share = np.array([t["tiles"] / t["track_tiles"] for t in tracks])
    finished = sum(t["finished_step"] is not None for t in tracks)
    fig = Figure(figsize=(9.0, 3.6))
    left, right = fig.subplots(1, 2)
    points = left.scatter(speed, scores, c=100 * off, cmap="viridis_r", s=14)
    fig.colorbar(points, ax=left, label="steps off the road (%)")
    left.set_xlabel("mean speed (world units/s; a tile is 3.5 units)")
    left.set_ylabel("return")
    left.set_title(f"{len(scores)} tracks: mean {scores.mean():.1f}, mean speed {speed.mean():.1f}", fontsize=9)
    left.grid(alpha=0.3)
    right.hist(100 * share, bins=np.arange(0, 102, 2.5), color="tab:blue", alpha=0.8)
    right.axvline(95, color="k", lw=1, ls="--", label="a lap ends at 95%")
    right.set_xlabel("tiles visited (% of the track's)")
    right.set_ylabel("tracks")
    right.set_title(f"laps finished in {results.get('max_steps', 1000)} steps: {finished} of {len(tracks)}", fontsize=9)
    right.legend(fontsize=8)
    return storage.save_figure(fig, out, dpi=100)


def temperature_figure(data_dir: Path, out: Path) -> Path:
    """:func:`temperature_plot` of ``temperature_study/results.json``."""
    path = Path(data_dir) / artifacts.TEMPERATURE_STUDY / "results.json"
    if not path.exists():
        raise storage.MissingDataError(f"no temperature study at {path} (run study_temperature.py)")
    study = storage.read_json(path)
    rows = study.get("rows")
    keys = ("temperature", "dream_mean", "dream_std", "real_mean", "real_std")
    if not rows or not all(isinstance(r, dict) and all(k in r for k in keys) for r in rows):
        raise storage.CorruptFileError(f"{path} holds no rows with {', '.join(keys)}; rerun study_temperature.py")
    return temperature_plot(out, sorted(rows, key=lambda r: r["temperature"]), study.get("real_trained"))


def _real_score(folder: Path) -> float | None:
    """The final real score of the controller in ``folder`` (``metrics.json`` "mean"), or None."""
    try:
        return float(storage.read_json(folder / artifacts.METRICS_FILE)["mean"])
    except (storage.MissingDataError, KeyError, TypeError, ValueError):
        return None


def best_controller_dir(data_dir: Path) -> Path:
    """The controller folder whose final real score (``metrics.json``) is highest.

    Candidates are ``controller/`` and every ``controller_dream_t<tau>/`` holding a
    ``controller.npz``; if none has been scored yet, ``controller/`` comes first.
    """
    data_dir = Path(data_dir)
    folders = [data_dir / artifacts.CONTROLLER] + [folder for _, folder in dream_controller_dirs(data_dir)]
    folders = [f for f in folders if (f / artifacts.CONTROLLER_FILE).exists() and (f / artifacts.CONFIG_FILE).exists()]
    if not folders:
        raise storage.MissingDataError(f"no trained controller under {data_dir} (run 05_train_controller.py)")
    scored = [(score, f) for f in folders if (score := _real_score(f)) is not None]
    return max(scored, key=lambda pair: pair[0])[1] if scored else folders[0]


def driving_animation(data_dir: Path | None, out: Path, episodes: int = 1, width: int = 160, max_frames: int = 120,
                      pretrained: str | None = None) -> Path:
    """A small GIF of the best controller (:func:`best_controller_dir`) driving on a held-out track.

    With ``pretrained`` (a name under ``pretrained/`` or a folder), the shipped agent drives
    instead, and ``data_dir`` is not read: a fresh clone draws it with no training. The
    controller is scored on the first ``episodes`` tracks of the final-evaluation stream (held
    out from training and selection) on stock pixels with ``evaluate_controller``'s own
    functions, and the episode with the median score is replayed at full size, downscaled to
    ``width`` pixels and subsampled to at most ``max_frames`` frames played at real speed (a few
    hundred KB).
    """
    from worldmodels import controller_evaluation as ec
    from worldmodels import rollout

    if episodes < 1 or width < 16 or max_frames < 2:
        raise ValueError(f"need episodes >= 1, width >= 16, max_frames >= 2; got {episodes}, {width}, {max_frames}")
    out = Path(out)
    if out.suffix.lower() != ".gif":
        raise ValueError(f"the driving animation is a .gif, got {out}")
    # One process is plenty for a few episodes and starts faster than a pool (same results, tested in 05);
    # the frames C sees are gymnasium's own, whatever the search trained on.
    run_here = {"controller.backend": "serial", "controller.workers": 1, "env.observation": "stock"}
    if pretrained is not None:
        from worldmodels import pretrained as shipped

        cfg, vae, rnn, params, _ = shipped.load(pretrained)
    else:
        folder = best_controller_dir(Path(data_dir))
        cfg = config.load_config(folder / artifacts.CONFIG_FILE)
        params, _ = artifacts.load_controller(folder / artifacts.CONTROLLER_FILE, "params", cfg.vae.z_size,
                                       cfg.rnn.hidden_units)
        vae, rnn = rollout.load_world_models(Path(data_dir), cfg)
    cfg = config.apply_overrides(cfg, run_here)
    seeds = rollout.heldout_seeds(cfg.controller.seed, episodes, rollout.FINAL_EVAL_SEED_OFFSET)
    metrics = ec.evaluate_params(cfg, vae, rnn, params, seeds, episodes, record_actions=True)
    median = int(np.argsort(metrics["scores"])[(len(metrics["scores"]) - 1) // 2])
    actions = metrics["actions"][median]
    stride = max(1, math.ceil((len(actions) + 1) / max_frames))

    def small_frames():
        from PIL import Image

        for t, frame in enumerate(ec.replay_frames(metrics["seeds"][median], actions, cfg.controller.max_steps, {})):
            if t % stride == 0:
                height = round(frame.shape[0] * width / frame.shape[1])
                yield np.asarray(Image.fromarray(frame).resize((width, height), Image.NEAREST))

    ec.write_video(small_frames(), out, fps=ec.VIDEO_FPS / stride)
    return out


# --------------------------------------------------------------------------- sample efficiency


@dataclass
class Curve:
    """Held-out real scores of one kind of controller against the real environment steps behind each score.

    ``steps`` (K,) counts every real step that went into the controller scored at that point (see
    :func:`sample_efficiency_curves`), ``mean`` and ``std`` (K,) are its return on the held-out real
    tracks; ``final`` is ``(steps, mean, std, episodes)`` of its final score (``metrics.json``) or None.
    """

    label: str
    steps: list[int]
    mean: list[float]
    std: list[float]
    final: tuple[int, float, float, int] | None = None


# The keys of a config's ``data`` section that decide which episodes stage 1 records (not how fast or how packed).
DATA_KEYS = ("policy", "seed", "episodes", "max_steps", "controller", "controller_noise", "expert_noise")


def stage1_steps(data_dir: Path) -> int:
    """Real steps of the data V and M were trained on.

    M's: one per frame of ``series/``, as ``06_iterate.py`` counts them in ``real_env_steps``; without
    ``series/`` one per frame of ``rollouts/`` (read from the file headers). V's: the frames its
    ``metrics.json`` says it trained and was scored on, counted apart only where they are other data (a V
    taken from another run: its config's ``data`` differs from ``rollouts/config.json``'s in a
    :data:`DATA_KEYS` key) or where the episodes are gone (a carried run: V's count then stands for both).
    0 without episodes or a V's metrics.
    """
    own = _episode_steps(data_dir)
    return _vision_steps(data_dir, other_data_only=True) + own if own is not None else _vision_steps(data_dir)


def _vision_steps(data_dir: Path, other_data_only: bool = False) -> int:
    """The frames V's ``metrics.json`` says it trained and was scored on (the larger if ``vae/`` and ``vae_gan/``
    both exist); with ``other_data_only`` only a V whose config's ``data`` differs from ``rollouts/config.json``'s
    (:func:`_other_data`)."""
    data = _data_section(artifacts.rollouts_dir(data_dir) / artifacts.CONFIG_FILE)
    frames = [0]
    for folder, _ in artifacts.VISION.values():
        m = _metrics(Path(data_dir) / folder / artifacts.METRICS_FILE) or {}
        if not other_data_only or _other_data(_data_section(Path(data_dir) / folder / artifacts.CONFIG_FILE), data):
            frames.append(int(m.get("train_frames", 0)) + int(m.get("heldout_frames", 0)))
    return max(frames)


def _other_data(a: dict | None, b: dict | None) -> bool:
    """Whether two ``data`` sections name other episodes: a key both have differs (configs written before a
    key existed lack it, which is no difference); unknown (a missing config) counts as the same data."""
    if a is None or b is None:
        return False
    return any(key in a and key in b and a[key] != b[key] for key in DATA_KEYS)


def _episode_steps(data_dir: Path) -> int | None:
    """Frames of ``series/`` (else of ``rollouts/``); None without either."""
    try:
        return sequences.series_steps(artifacts.series_dir(data_dir))
    except storage.MissingDataError:
        pass
    try:
        paths = storage.list_episodes(artifacts.rollouts_dir(data_dir))
    except storage.MissingDataError:
        return None
    return int(sum(datasets.check_episodes(paths)))


def _data_section(path: Path) -> dict | None:
    """The :data:`DATA_KEYS` the ``data`` section of the config at ``path`` has; None without the file."""
    if not path.is_file():
        return None
    data = storage.read_json(path).get("data") or {}
    return {key: data[key] for key in DATA_KEYS if key in data}


def collector_steps(data_dir: Path) -> int:
    """Real steps behind the controller that drove stage 1's data (``data.policy`` with ``controller``, as
    ``rollouts/config.json`` records it); 0 for data of the built-in policies. Data driven by a trained
    controller cost that controller's training too, so a dream-trained controller learning from it is not
    counted as if it had started from nothing.

    Counted: what its search had spent when the driving parameters existed, i.e. up to and including the
    generation its ``params`` come from (:func:`artifacts.selected_generation`; stage 1 drives with ``params``):
    that generation's and the earlier ones' real training episodes and held-out evaluations. A search that
    went on afterwards (the long run kept generation 180 of 240) and the final 100-track score did not make
    the driver, so they are not counted.

    A collecting controller whose ``eval.csv`` is missing (a bare copy of ``controller.npz``) is a
    :class:`~worldmodels.storage.MissingDataError` that says so: its cost is then unknown, not zero.
    """
    path = artifacts.rollouts_dir(data_dir) / artifacts.CONFIG_FILE
    data = (storage.read_json(path).get("data") or {}) if path.is_file() else {}
    if "controller" not in dict(config.parse_policy_mix(data.get("policy") or "brownian")):
        return 0
    folder = Path(data.get("controller") or "")
    folder = folder.parent if folder.suffix == ".npz" else folder
    from worldmodels import controller_training as ct

    if not (folder / ct.EVAL_NAME).is_file():
        raise storage.MissingDataError(
            f"stage 1's data of {data_dir} was driven by the controller in {folder}, which has no {ct.EVAL_NAME} "
            "(and history.csv): the real steps behind it cannot be counted; copy them there from the search it "
            "came from")
    return _search_curve(folder, "", 0, upto=_params_generation(folder / artifacts.CONTROLLER_FILE))[1]


def _params_generation(path: Path) -> int:
    """The generation the ``params`` of the ``controller.npz`` at ``path`` come from."""
    try:
        return artifacts.selected_generation(artifacts.controller_scalars(path), "params")
    except (storage.CorruptFileError, KeyError) as exc:  # unreadable, or no "generation" in it
        raise storage.CorruptFileError(f"{path}: unreadable or without a generation ({exc}); the generation of the "
                                       "controller that drove stage 1 is unknown") from exc


def _steps_cell(value) -> float:
    """An ``env_steps`` cell as a number; missing or NaN (rows of older files) counts as 0."""
    value = 0.0 if value is None else float(value)
    return 0.0 if math.isnan(value) else value


def _trained_in_reality(folder: Path) -> bool:
    """Whether the search in ``folder`` trained in the real env (its ``config.json``, else its folder name)."""
    path = folder / artifacts.CONFIG_FILE
    if path.is_file():
        return (storage.read_json(path).get("controller") or {}).get("env", "real") != "dream"
    return not folder.name.startswith(artifacts.DREAM_CONTROLLER_PREFIX)


def _search_curve(folder: Path, label: str, offset: int, upto: int | None = None) -> tuple[Curve, int]:
    """The held-out evaluations of the search in ``folder`` and ``offset`` + the real steps it spent in all.

    A point's steps are ``offset`` plus the search's real steps up to and including that evaluation
    (``controller_training.search_cost``): its training episodes if it trained in the real env (a dream
    search's ``history.csv`` counts dream steps, which are not real) and its held-out evaluations. The
    total (and the final score's steps) adds every generation run and the final evaluation; with ``upto``,
    the search as it was at generation ``upto`` (the generations after it and the final score left out).
    """
    from worldmodels import controller_training as ct

    evals = ct.read_evals(folder / ct.EVAL_NAME)
    history = folder / "history.csv"
    history = _read_rows(history) if history.is_file() and _trained_in_reality(folder) else []
    if upto is not None:
        evals = {g: row for g, row in evals.items() if g <= upto}
        history = [row for row in history if row["generation"] <= upto]
    cost = ct.search_cost(history, evals)
    g = sorted(evals)
    total = offset + int(sum(_steps_cell(row.get("env_steps")) for row in history)
                         + sum(_steps_cell(evals[i].get("env_steps")) for i in g))
    m = _metrics(folder / artifacts.METRICS_FILE) if upto is None else None
    final = None
    if m is not None and m.get("mean") is not None:
        total += int(_steps_cell(m.get("steps")))
        final = (total, float(m["mean"]), float(m.get("std", math.nan)), int(m.get("episodes", 0)))
    curve = Curve(label, [offset + cost[i][0] for i in g], [evals[i]["mean"] for i in g],
                  [evals[i]["std"] for i in g], final)
    return curve, total


def _hybrid_start(data_dir: Path, hybrid: Path) -> Path:
    """The folder of the controller the hybrid search in ``hybrid`` started from (its ``controller.init_from``)."""
    saved = (storage.read_json(hybrid / artifacts.CONFIG_FILE).get("controller") or {}).get("init_from")
    if not saved:
        raise storage.CorruptFileError(f"{hybrid / artifacts.CONFIG_FILE} names no controller.init_from; the real "
                                       "steps behind the hybrid's start cannot be counted")
    start = Path(data_dir) / saved
    start = start.parent if start.suffix == ".npz" else start
    if not start.is_dir():
        raise storage.MissingDataError(f"{start}, the controller {hybrid} started from, is gone: the real steps "
                                       "behind it cannot be counted")
    return start


def _iterations_curve(data_dir: Path, driver: int) -> Curve | None:
    """The real score of each iteration of ``06_iterate.py`` against its ``real_env_steps`` (stage 1's data and
    every iteration's collection, evaluations, curiosity and repair) plus the frames of a V trained on other data,
    the real steps behind stage 1's driver (``driver``, :func:`collector_steps`) and those spent by the search its
    iteration 1 started from
    (:func:`artifacts.iterations_start_dir`: as recorded, else by the folders present)."""
    from worldmodels import iterate

    root = data_dir / artifacts.ITERATIONS
    table = root / artifacts.ITERATIONS_TABLE
    if not table.is_file():
        return None
    keys = ("real_env_steps", "real_score", "real_std")
    try:
        rows = [{key: float(row[key]) for key in keys} for row in iterate.read_rows(table)]
    except ValueError as exc:
        raise storage.CorruptFileError(f"{table} is not an iterations table with {', '.join(keys)} ({exc})") from exc
    saved = root / artifacts.CONFIG_FILE
    tau = (config.load_config(saved) if saved.is_file() else config.Config()).dream.temperature
    start = artifacts.iterations_start_dir(data_dir, tau)
    # real_env_steps counts M's data (stage 1's series) but not a V trained on other data.
    offset = driver + _vision_steps(data_dir, other_data_only=True) + (
        0 if start is None else _search_curve(start, "", 0)[1])
    label = f"iterative dream (06_iterate.py, from {start.name if start else 'zeros'})"
    return Curve(label, [offset + int(r["real_env_steps"]) for r in rows], [r["real_score"] for r in rows],
                 [r["real_std"] for r in rows])


def _table_number(text: str, digits: int = 1) -> str:
    value = float(text)
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def iterations_table(data_dir) -> str:
    """``<data>/iterations/iterations.csv`` as a markdown table (one row per iteration) for a README.

    Columns: the episodes M had been trained on by policy, the real environment steps used so far (stage 1's
    data, collections, repairs, the curiosity's episodes, every evaluation), the previous M on the episodes just
    collected (z NLL; predicted minus real return of their recorded actions over ``diagnostics.HORIZON``
    steps), the repair's latent disagreement (kept windows / all candidates), the controller's dream and real
    scores (on ``iterate.eval_episodes`` held-out tracks), their difference and the iteration's wall time.
    "–" is a value that was not measured (an option that was off, or a table written before the column).
    """
    from worldmodels import diagnostics, iterate

    root = Path(data_dir) / artifacts.ITERATIONS
    table = root / artifacts.ITERATIONS_TABLE
    rows = iterate.read_rows(table)  # columns added after a table was written read as "nan"
    if not rows:
        raise storage.MissingDataError(f"{table} holds no iteration yet; run: python 06_iterate.py")
    saved = root / artifacts.CONFIG_FILE
    tracks = config.load_config(saved).iterate.eval_episodes if saved.is_file() else "?"
    head = ["iteration", "episodes M trained on", "real env steps so far", "M's z NLL on the new episodes",
            f"M's return minus the real one, same actions ({diagnostics.HORIZON} steps)",
            "repair: dream-vs-real z error (kept / all)", "dream score", f"real score ({tracks} tracks)",
            "dream − real", "wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        policies = ", ".join(part.replace(":", " ") for part in row["episodes_by_policy"].split(";"))
        try:
            repair = f"{_table_number(row['repair_disagreement'])} / {_table_number(row['repair_disagreement_all'])}"
            cells = [row["iteration"], policies, f"{int(row['real_env_steps']) / 1e6:.2f} M",
                     _table_number(row["m_z_nll_new"], 3), _table_number(row["exploit_gap_same_actions"]),
                     "–" if math.isnan(float(row["repair_disagreement"])) else repair,
                     _table_number(row["dream_score"]),
                     f"{_table_number(row['real_score'])} ± {_table_number(row['real_std'])}",
                     _table_number(row["exploit_gap"]), f"{float(row['seconds']) / 3600:.2f} h"]
        except ValueError as exc:
            raise storage.CorruptFileError(f"{table} is not an iterations table ({exc})") from exc
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sample_efficiency_curves(data_dir: Path, driver: int | None = None, stage1: int | None = None) -> list[Curve]:
    """Every curve of :func:`sample_efficiency` that ``data_dir`` holds, with the real steps each point cost.

    Every point counts stage 1's data (:func:`stage1_steps`: V and M, which every controller reads,
    were trained on it) and the real steps behind the controller that drove it, if one did
    (:func:`collector_steps`), plus: for ``controller/`` its real training and held-out evaluations so far;
    for each ``controller_dream_t<tau>/`` its held-out evaluations only (it trains in M's dream); for
    ``controller_hybrid/`` everything its start controller spent (a dream one: its evaluations and final
    score) plus its own real training and evaluations; for ``iterations/`` what :func:`_iterations_curve`
    says. A final score adds the whole search and its final evaluation. Folders without scores are left out.
    ``driver``, ``stage1``: :func:`collector_steps` and :func:`stage1_steps` of ``data_dir`` if the caller has them.
    """
    data_dir = Path(data_dir)
    driver = collector_steps(data_dir) if driver is None else driver
    base = (stage1_steps(data_dir) if stage1 is None else stage1) + driver
    curves = []
    if (data_dir / artifacts.CONTROLLER).is_dir():
        curves.append(_search_curve(data_dir / artifacts.CONTROLLER, "stage 5 in the real env", base)[0])
    for tau, folder in dream_controller_dirs(data_dir):
        curves.append(_search_curve(folder, f"stage 5 in the dream, tau={tau:g}", base)[0])
    hybrid = data_dir / artifacts.HYBRID_CONTROLLER
    if hybrid.is_dir():
        start = _hybrid_start(data_dir, hybrid)
        spent = _search_curve(start, "", base)[1]
        curves.append(_search_curve(hybrid, f"dream + real fine-tuning (from {start.name})", spent)[0])
    curves.append(_iterations_curve(data_dir, driver))
    return [c for c in curves if c is not None and (c.steps or c.final)]


def sample_efficiency(data_dirs, out: Path) -> Path:
    """Held-out real score against the real environment steps behind it, for every controller of ``data_dirs``.

    ``data_dirs``: one data dir or a list of them (labels then start with the folder's name). One curve
    per :func:`sample_efficiency_curves` (mean with a +- std band; a star with its std for a final
    score); x on a log scale. Nothing to draw is a :class:`~worldmodels.storage.MissingDataError`.
    """
    dirs = [Path(data_dirs)] if isinstance(data_dirs, (str, os.PathLike)) else [Path(d) for d in data_dirs]
    curves, counted = [], []
    for folder in dirs:
        driver, data_steps = collector_steps(folder), stage1_steps(folder)
        found = sample_efficiency_curves(folder, driver, data_steps)
        prefix = f"{folder.name}: " if len(dirs) > 1 else ""
        for curve in found:
            curve.label = prefix + curve.label
        curves += found
        counted += [f"{prefix}{data_steps:,}" + (f" + {driver:,} of its driver's training" if driver else "")
                    ] if found else []
    stage1 = "; ".join(counted)
    if len(stage1) > 70:  # one line per data dir rather than a label wider than the figure
        stage1 = "\n" + "\n".join(counted)
    if not curves:
        raise storage.MissingDataError(
            f"no held-out real score under {', '.join(map(str, dirs))} (run 05_train_controller.py in the real "
            "env, in the dream or with controller.init_from, or 06_iterate.py)")
    return sample_efficiency_plot(curves, out, stage1)


def sample_efficiency_plot(curves: list[Curve], out: Path, stage1: str = "") -> Path:
    """Draw ``curves`` (:class:`Curve`) to ``out``; ``stage1`` says how many steps of stage 1's data are counted."""
    fig = Figure(figsize=(8.5, 4.8))
    ax = fig.subplots()
    for i, curve in enumerate(curves):
        colour = f"C{i % 10}"
        x, mean, std = (np.asarray(v, np.float64) for v in (curve.steps, curve.mean, curve.std))
        if len(x):
            ax.plot(x, mean, "o-", ms=4, color=colour, label=f"{curve.label} (+- std)")
            if len(x) > 1:
                ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
            else:
                ax.errorbar(x, mean, yerr=std, fmt="none", color=colour, capsize=3)
        if curve.final is not None:
            steps, score, spread, episodes = curve.final
            ax.errorbar([steps], [score], yerr=[spread], fmt="*", ms=13, color=colour, capsize=3,
                        markeredgecolor="k", label=f"{curve.label}: final score, {episodes} held-out tracks")
    if all(v > 0 for c in curves for v in c.steps + ([c.final[0]] if c.final else [])):
        ax.set_xscale("log")
    ax.set_xlabel("real environment steps behind the controller\n(stage 1's data for V and M + real training + "
                  f"held-out evaluations){f'; stage 1: {stage1} steps' if stage1 else ''}", fontsize=7)
    ax.set_ylabel("return on held-out real tracks")
    ax.set_title("Sample efficiency: score in the real CarRacing-v3 against real steps", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return storage.save_figure(fig, out, dpi=100)


# --------------------------------------------------------------------------- all of them, and the table

FIGURES = {
    "reconstructions": reconstruction_figure,
    "dream_strip": dream_strip_figure,
    "learning_curve": learning_curve_figure,
    "temperature": temperature_figure,
    "driving": driving_animation,
}


def make_all(data_dir: Path, out_dir: Path, log=print) -> dict[str, Path | str]:
    """Make every figure of :data:`FIGURES` whose inputs exist into ``out_dir``.

    Returns ``{name: path written}`` for the figures made and ``{name: "skipped: <reason>"}``
    for those whose inputs are missing (the reason names the command that makes them). Any
    other error (a damaged file, an incompatible config) is raised: it needs fixing, not skipping.
    """
    results: dict[str, Path | str] = {}
    for name, make in FIGURES.items():
        try:
            results[name] = make(Path(data_dir), Path(out_dir) / FILE_NAMES[name])
            log(f"made {name}: {results[name]}")
        except storage.MissingDataError as exc:
            results[name] = f"skipped: {exc}"
            log(f"skipped {name}: {exc}")
    return results


def _metrics(path: Path) -> dict | None:
    return storage.read_json(path) if path.exists() else None


def _f(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _vision_row(data_dir: Path, model_name: str) -> list[str]:
    folder = artifacts.VISION[model_name][0]
    m = _metrics(data_dir / folder / artifacts.METRICS_FILE)
    label = {"vae": "V (VAE)", "vae_gan": "V (VAE-GAN)"}[model_name]
    if m is None:
        return [label, NOT_RUN, f"`{folder}/metrics.json`"]
    z = len(m["kl_per_dimension"]) if "kl_per_dimension" in m else "?"
    text = (f"PSNR {_f(m.get('psnr_db'), 2)} dB (MSE {_f(m.get('reconstruction_mse'), 5)}), KL "
            f"{_f(m.get('kl_per_frame'), 2)} nats/frame, {m.get('active_dimensions', '?')} of {z} active dimensions "
            f"({_count(m.get('heldout_frames'))} held-out frames)")
    return [label, text, f"`{folder}/metrics.json`"]


def _rnn_row(data_dir: Path) -> list[str]:
    m = _metrics(artifacts.rnn_dir(data_dir) / artifacts.METRICS_FILE)
    if m is None:
        return ["M (MDN-RNN)", NOT_RUN, "`rnn/metrics.json`"]
    base = m.get("baselines", {})
    informative = m.get("informative_dimensions")
    comparisons = [
        ("z sampled from V's posterior", m.get("z_nll_sampled"), base.get("sampled")),
        (f"z = mu, the {len(informative) if informative is not None else '?'} informative dims",
         m.get("z_nll_informative"), m.get("baselines_informative")),
        (f"z = mu, all {len(m.get('z_nll_per_dimension', [])) or '?'} dims", m.get("z_nll"), base.get("mu")),
    ]
    parts = [f"{name} **{ours:.2f}** vs {_f(b.get('persistence'), 2)} / {_f(b.get('unconditional'), 2)}"
             for name, ours, b in comparisons if ours is not None and b]
    if parts:
        text = ("held-out NLL per dimension (nats), M vs the baselines z<sub>t+1</sub> = z<sub>t</sub> + noise / "
                "unconditional Gaussian: " + "; ".join(parts))
    else:
        text = f"held-out NLL per dimension {_f(m.get('z_nll'), 3)} nats"
    if m.get("reward_mse") is not None:
        text += f". Reward MSE {m['reward_mse']:.3f} vs {_f(base.get('reward_mse_of_train_mean'), 3)} for the mean"
    return ["M (MDN-RNN)", text, "`rnn/metrics.json`"]


def _score(m: dict) -> str:
    return f"{_f(m.get('mean'), 1)} ± {_f(m.get('std'), 1)} over {m.get('episodes', '?')} held-out tracks"


def _unfinished(folder: Path) -> str:
    """"not run", or how far a search without a final score has come (from its history.csv)."""
    try:
        generations = len(_read_rows(folder / "history.csv"))
    except (OSError, storage.CorruptFileError):
        return NOT_RUN
    return f"{NOT_RUN} to the end: {generations} generation(s) in `history.csv`, no final score yet"


def _controller_rows(data_dir: Path) -> list[list[str]]:
    m = _metrics(data_dir / artifacts.CONTROLLER / artifacts.METRICS_FILE)
    rows = [["C, trained in the real env",
             _unfinished(data_dir / artifacts.CONTROLLER) if m is None
             else f"**{_score(m)}** (generation {m.get('generation', '?')})", "`controller/metrics.json`"]]
    dreams = dream_controller_dirs(data_dir)
    if not dreams:
        rows.append(["C, trained in the dream", NOT_RUN, "`controller_dream_t<tau>/metrics.json`"])
    for tau, folder in dreams:
        m = _metrics(folder / artifacts.METRICS_FILE)
        dream = (m or {}).get("dream") or {}
        text = (_unfinished(folder) if m is None else
                f"real: **{_score(m)}**; in the dream: {_f(dream.get('mean'), 1)} ± {_f(dream.get('std'), 1)} "
                f"(generation {m.get('generation', '?')})")
        rows.append([f"C, trained in the dream, tau={tau:g}", text, f"`{folder.name}/metrics.json`"])
    return rows


def results_table(data_dir: Path) -> str:
    """The results as markdown, gathered from every stage's ``metrics.json``; a stage not run says "not run".

    One table (V, VAE-GAN as V, M against its baselines, C trained in the real environment,
    C trained in the dream per tau), then the VAE vs VAE-GAN comparison of ``compare/comparison.json``.
    """
    data_dir = Path(data_dir)
    rows = [_vision_row(data_dir, "vae"), _vision_row(data_dir, "vae_gan"), _rnn_row(data_dir),
            *_controller_rows(data_dir)]
    lines = ["| stage | held-out result | file |", "| --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    comparison = _metrics(data_dir / artifacts.COMPARE / "comparison.json")
    lines += ["", "**VAE vs VAE-GAN** (`compare/comparison.json`): "]
    if comparison is None:
        lines[-1] += f"{NOT_RUN} (python -m vae_gan.compare --data-dir {data_dir})"
    else:
        # vae_gan.compare writes comparison.md from comparison.json in the same call; reading it
        # keeps this module below the comparison (no import of an experiment's report code).
        report = data_dir / artifacts.COMPARE / "comparison.md"
        lines += ["", report.read_text() if report.exists() else f"(comparison.md is missing beside {report.parent})"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=sorted(FIGURES) + ["all", "architecture", "profile", "sample_efficiency",
                                                             "search_table", "iterations_table"],
                        help="a figure, all of them, the diagram of the agent (no data needed), how a controller "
                             "drove (profile, from --evaluation), the held-out "
                             "real score against real environment steps of every controller, or (search_table) "
                             "the held-out evaluations of one search with their cost as a markdown table, or "
                             "(iterations_table) <data-dir>/iterations/iterations.csv as a markdown table")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("WORLDMODELS_DATA", "data")))
    parser.add_argument("--out", type=Path, help="output file of one figure")
    parser.add_argument("--out-dir", type=Path, help="output folder of 'all'")
    parser.add_argument("--pretrained", metavar="NAME", help="'driving': the shipped agent in pretrained/NAME/ "
                                                             "drives (no --data-dir needed)")
    parser.add_argument("--also-data-dir", type=Path, action="append", default=[], metavar="DIR",
                        help="'sample_efficiency': another data dir whose controllers are drawn too (repeatable)")
    parser.add_argument("--search", type=Path, metavar="DIR", help="'search_table': the search folder "
                                                                      "(default: <data-dir>/controller)")
    parser.add_argument("--cores", type=int, help="'search_table': CPU cores of the machine the search ran on, "
                                                  "for a core-hours column")
    parser.add_argument("--evaluation", type=Path, metavar="FILE.json", help="'profile': a results file of "
                                                                             "evaluate_controller.py --profile")
    args = parser.parse_args(argv)
    if (args.evaluation is None) != (args.figure != "profile"):
        parser.error("'profile' needs --evaluation FILE.json (and only 'profile' takes it)")
    if args.figure == "profile":
        if args.out is None:
            parser.error("'profile' needs --out")
        print(f"wrote {profile_figure(args.evaluation, args.out)}")
        return 0
    if (args.search or args.cores) and args.figure != "search_table":
        parser.error("--search and --cores go with 'search_table' only")
    if args.figure in ("search_table", "iterations_table"):
        if args.figure == "search_table":
            from worldmodels.controller_training import search_table

            text = search_table(args.search or args.data_dir / artifacts.CONTROLLER, args.cores)
        else:
            text = iterations_table(args.data_dir)
        if args.out:
            storage.atomic_write_text(args.out, text)
        print(text, end="")
        return 0
    if args.also_data_dir and args.figure != "sample_efficiency":
        parser.error("--also-data-dir goes with the 'sample_efficiency' figure only")
    if args.pretrained and args.figure != "driving":
        parser.error("--pretrained goes with the 'driving' figure only")
    if args.figure == "all":
        if args.out_dir is None:
            parser.error("'all' needs --out-dir")
        results = make_all(args.data_dir, args.out_dir, log=lambda message: None)
        for name, result in results.items():
            if isinstance(result, str):
                print(f"skipped {name}: {result.removeprefix('skipped: ')}")
            else:
                print(f"made {name}: {result}")
        return 0
    if args.out is None:
        parser.error(f"{args.figure!r} needs --out")
    if args.pretrained:
        print(f"wrote {driving_animation(None, args.out, pretrained=args.pretrained)}")
        return 0
    if args.figure == "sample_efficiency":
        print(f"wrote {sample_efficiency([args.data_dir, *args.also_data_dir], args.out)}")
        return 0
    make = architecture_figure if args.figure == "architecture" else FIGURES[args.figure]
    print(f"wrote {make(args.data_dir, args.out)}")
    return 0


def console() -> None:
    """The ``wm-figures`` command of ``pip install -e .``: :func:`main` with one-line user errors."""
    from worldmodels import cli

    cli.run(main)


if __name__ == "__main__":
    console()
