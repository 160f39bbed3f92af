"""A measured comparison of V kinds (the paper's VAE against the VAE-GAN) on the same held-out frames.

    python -m vae_gan.compare --run vae=D_vae --run vae_gan=D_gan --out results/compare
    python -m vae_gan.compare --run vae_seed0=D0 --run vae_seed1=D1 --run gan_seed0=D2 --run gan_seed1=D3
    python -m vae_gan.compare --data-dir data          # every V trained in one data dir (vae/ and vae_gan/)
    python -m vae_gan.compare --run gan_seed2=D4 --previous results/compare_small/comparison.json
                                                       # seeds measured in another session join the tables

Layout. A *run* is ``NAME=DIR``, where DIR is either

* a data dir holding exactly one trained V, as made by
  ``python run_pipeline.py --data-dir D_vae`` and
  ``python run_pipeline.py --data-dir D_gan --set vae.model=vae_gan``: V, M and C of one kind; or
* a V folder itself, ``D/vae`` or ``D/vae_gan``, for the simpler layout of one data dir in which
  both V were trained with ``02_train_vae.py`` side by side (then M and C exist only for the V
  that the downstream stages used, and only that run gets their numbers).

The V kind of a run is read from the ``config.json`` in its V folder (``vae.model``), never from
its name; runs of the same kind (e.g. seeds ``vae_seed0``, ``vae_seed1``) are aggregated as mean
± std (ddof 1) in a second table. Every run's data dir must hold the same rollouts (checked by
file names and sizes); the frames compared are those of the held-out episodes of the *first*
run's split (``datasets.split_episodes`` with its ``vae.heldout_fraction`` and ``vae.split_seed``). A
run whose own split trained on some of those episodes (another ``vae.split_seed``) is flagged; seeds
of V (``vae.seed``) leave the split alone.

Metrics per run, streamed one episode and one batch at a time (memory: one episode, a batch per
run, and the posterior means (N, Z) for the active dimensions):

* ``reconstruction_mse``, ``psnr_db``: of the posterior-mean reconstruction, exactly as
  ``02_train_vae.py`` reports them (``models.vae.reconstruction_metrics``; frames in [0, 1]).
* ``edge_mse``: the squared error averaged over the *edge pixels* only (all 3 channels). Edge
  pixels are defined on the ORIGINAL frame: the Sobel gradient magnitude of its luma
  (0.299 R + 0.587 G + 0.114 B, in [0, 1]) exceeds ``EDGE_THRESHOLD`` = 0.5. A road/grass boundary
  (luma 0.40 against 0.63) gives a magnitude of about 0.9 and the car and kerbs more, while the
  alternating grass stripes (luma 0.63 against 0.69) give about 0.24, so the mask is the track's
  borders, the kerbs and the car, two to three pixels wide. The 1-pixel frame border is never an
  edge (no full 3x3 neighbourhood). Pooled over all edge pixels of all frames.
* ``sharpness``: mean over frames of the variance of the Laplacian (3x3 kernel
  [[0, 1, 0], [1, -4, 1], [0, 1, 0]] on the luma, valid 62 x 62 region) of the reconstructions,
  divided by the same for the originals: 1.0 is as sharp as the real frames, < 1 blurrier.
* ``kl_per_frame`` (nats), ``kl_per_dimension``, ``active_dimensions`` (``models.vae`` helpers).
* ``rnn``: M's held-out ``z_nll`` and ``z_nll_sampled`` from ``<data>/rnn/metrics.json`` if M was
  trained on this V (``rnn/config.json`` names the same ``vae.model`` and ``vae.z_size``), else
  ``"not run"``.
* ``controller``: C's real score (``mean``, ``std``, ``episodes``) from
  ``<data>/controller/metrics.json`` under the same condition, else ``"not run"``.

Runs measured in another session (an hour per VAE-GAN seed on 2 CPU cores) join with ``--previous
comparison.json``, provided that comparison scored the very same frames: same held-out episode
names, frame count, SHA-256 of the uint8 frames and edge threshold (rollouts are reproducible from
``data.seed``, so a regenerated stage 1 passes; anything else is refused). Their numbers are carried
over, not re-measured, and each keeps its ``source`` and ``measured_at``.

Outputs in ``--out`` (default ``<first run's data dir>/compare``): ``comparison.json``,
``comparison.md`` (the tables that ``main`` prints) and ``reconstructions.png`` (held-out
originals on the top row, then one row per run). A missing folder, a missing V or mismatched
rollouts is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

import config
from worldmodels import artifacts, cli, datasets, figures, metrics, storage

# TensorFlow and Keras are imported in load_models(), after every check: a bad --run is then
# reported at once, not after a 5-second import.

REPO = Path(__file__).resolve().parent.parent
EDGE_THRESHOLD = 0.5
LUMA = np.array([0.299, 0.587, 0.114])
SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
LAPLACIAN = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
NOT_RUN = "not run"
# Numbers aggregated over the runs of one V kind, with the name shown in the tables.
AGGREGATED = {
    "reconstruction_mse": "MSE", "psnr_db": "PSNR (dB)", "edge_mse": "edge MSE", "sharpness": "sharpness",
    "kl_per_frame": "KL (nats/frame)", "active_dimensions": "active dims", "z_nll": "M z NLL (z = mu)",
    "z_nll_sampled": "M z NLL (z sampled)", "z_nll_sampled_gain": "M gain over baseline (z sampled)",
    "controller_score": "C score (real)",
}
_DIGITS = {"reconstruction_mse": 5, "edge_mse": 5, "psnr_db": 2, "sharpness": 3, "kl_per_frame": 2,
           "active_dimensions": 1, "z_nll": 3, "z_nll_sampled": 3, "z_nll_sampled_gain": 3,
           "controller_score": 1}


@dataclass(frozen=True)
class Run:
    """One trained V to compare: its name, data dir, kind ('vae' or 'vae_gan') and saved config."""

    name: str
    data_dir: Path
    kind: str
    cfg: config.Config

    @property
    def v_dir(self) -> Path:
        return artifacts.vision_dir(self.data_dir, self.cfg)


# --------------------------------------------------------------------------- runs


def resolve_run(name: str, path: str | os.PathLike) -> Run:
    """The run ``name`` at ``path``: a data dir holding exactly one trained V, or a V folder (``D/vae``, ``D/vae_gan``).

    Raises:
        storage.MissingDataError: no such folder, or no trained V in it.
        config.ConfigError: a bad name, or a data dir with both V (the message says how to pick one).
    """
    if not name or any(c in name for c in "|=;\n"):
        raise config.ConfigError(f"bad run name {name!r}: use a non-empty name without | = ; (e.g. vae_seed0)")
    path = Path(path)
    if not path.is_dir():
        raise storage.MissingDataError(f"run {name!r}: no folder {path}")
    kinds = {kind: folder for kind, (folder, _file) in artifacts.VISION.items()}
    if path.name in kinds.values() and (path / artifacts.CONFIG_FILE).is_file():
        v_dirs = [path]
    else:
        v_dirs = [path / folder for folder in kinds.values() if (path / folder / artifacts.CONFIG_FILE).is_file()]
    if not v_dirs:
        raise storage.MissingDataError(
            f"run {name!r}: {path} holds no trained V (neither vae/ nor vae_gan/ with a config.json); "
            f"train one with: python 02_train_vae.py --data-dir {path}")
    if len(v_dirs) > 1:
        raise config.ConfigError(
            f"run {name!r}: {path} holds both vae/ and vae_gan/; name the V folder instead, "
            f"e.g. {name}={path / 'vae'} or {name}={path / 'vae_gan'}")
    v_dir = v_dirs[0]
    cfg = config.load_config(v_dir / artifacts.CONFIG_FILE)
    if artifacts.VISION[cfg.vae.model][0] != v_dir.name:
        raise config.ConfigError(f"run {name!r}: {v_dir}/config.json says vae.model={cfg.vae.model!r}, "
                                 f"which does not live in a folder named {v_dir.name!r}")
    run = Run(name, v_dir.parent, cfg.vae.model, cfg)
    model_path = artifacts.vision_path(run.data_dir, cfg)
    if not model_path.is_file():
        hint = " --set vae.model=vae_gan" if run.kind == "vae_gan" else ""
        raise storage.MissingDataError(f"run {name!r}: no trained V at {model_path} (training unfinished?); "
                                       f"finish it with: python 02_train_vae.py --data-dir {run.data_dir}{hint}")
    return run


def parse_run(spec: str, base: Path | None = None) -> Run:
    """``"NAME=DIR"`` -> :class:`Run`; a relative DIR is taken relative to ``base`` (default: the working dir)."""
    name, eq, folder = spec.partition("=")
    if not eq or not folder.strip():
        raise config.ConfigError(f"--run expects NAME=DIR, got {spec!r}")
    path = Path(folder.strip()).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    return resolve_run(name.strip(), path)


def runs_in_data_dir(data_dir: str | os.PathLike) -> list[Run]:
    """Every trained V in one data dir (``vae/`` then ``vae_gan/``), each run named by its kind."""
    data_dir = Path(data_dir)
    runs = [resolve_run(kind, data_dir / folder) for kind, (folder, _file) in artifacts.VISION.items()
            if (data_dir / folder / artifacts.CONFIG_FILE).is_file()]
    if not runs:
        raise storage.MissingDataError(f"no trained V under {data_dir} (neither vae/ nor vae_gan/); "
                                       "train one with: python 02_train_vae.py")
    return runs


def _env_list(environ: Mapping[str, str], name: str) -> list[str]:
    """The non-empty, stripped items of the ``;``-separated variable ``name``."""
    return [item.strip() for item in environ.get(name, "").split(";") if item.strip()]


def _repeated(names: Sequence[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    return sorted({n for n in names if names.count(n) > 1})


def runs_from_environment(root: Path = REPO, environ: Mapping[str, str] = os.environ) -> list[Run]:
    """Runs named by ``$WORLDMODELS_COMPARE`` (``"name=DIR;name=DIR"``), else every V in ``$WORLDMODELS_DATA`` (default data).

    Relative folders are relative to ``root`` (the repository).
    """
    specs = _env_list(environ, "WORLDMODELS_COMPARE")
    if specs:
        return check_names([parse_run(spec, root) for spec in specs])
    data_dir = Path(environ.get("WORLDMODELS_DATA", "data"))
    return runs_in_data_dir(data_dir if data_dir.is_absolute() else root / data_dir)


def previous_from_environment(root: Path = REPO, environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Earlier comparison.json files named by ``$WORLDMODELS_COMPARE_PREVIOUS`` (``;``-separated; relative to ``root``)."""
    paths = [Path(p).expanduser() for p in _env_list(environ, "WORLDMODELS_COMPARE_PREVIOUS")]
    return [p if p.is_absolute() else root / p for p in paths]


def check_names(runs: Sequence[Run]) -> list[Run]:
    names = [run.name for run in runs]
    duplicates = _repeated(names)
    if duplicates:
        raise config.ConfigError(f"run names must be unique, got {', '.join(duplicates)} more than once")
    if not runs:
        raise config.ConfigError("nothing to compare: give at least one --run NAME=DIR")
    return list(runs)


def rollout_files(run: Run) -> list[Path]:
    return storage.list_episodes(artifacts.rollouts_dir(run.data_dir), artifacts.ROLLOUTS,
                                 hint=f"run {run.name!r} needs the rollouts its V was trained on.")


def check_same_rollouts(runs: Sequence[Run]) -> list[Path]:
    """The first run's rollout files, after checking every run has the same ones (names and sizes).

    Raises:
        config.ConfigError: naming the two runs and the first file that differs.
    """
    def signature(paths):
        return {p.name: p.stat().st_size for p in paths}

    reference = rollout_files(runs[0])
    expected = signature(reference)
    for run in runs[1:]:
        got = signature(rollout_files(run))
        if got == expected:
            continue
        only_first = sorted(set(expected) - set(got))
        only_this = sorted(set(got) - set(expected))
        resized = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
        if only_first:
            detail = f"{only_first[0]} is missing from {run.data_dir / artifacts.ROLLOUTS}"
        elif only_this:
            detail = f"{only_this[0]} exists only in {run.data_dir / artifacts.ROLLOUTS}"
        else:
            detail = f"{resized[0]} has {got[resized[0]]} bytes instead of {expected[resized[0]]}"
        raise config.ConfigError(
            f"runs {runs[0].name!r} and {run.name!r} were not trained on the same rollouts "
            f"({len(expected)} vs {len(got)} episodes; {detail}); a comparison needs identical rollouts")
    return reference


def evaluation_episodes(runs: Sequence[Run], paths: Sequence[Path]) -> list[Path]:
    """The held-out episodes of the first run's split (its training episodes if it held none out)."""
    cfg = runs[0].cfg
    train, heldout = datasets.split_episodes(paths, cfg.vae.heldout_fraction, cfg.vae.split_seed)
    return heldout or train


def episodes_seen_in_training(run: Run, evaluated: Sequence[Path], paths: Sequence[Path]) -> int:
    """How many evaluated episodes ``run``'s V trained on (its ``split.json``, else its split recomputed)."""
    split_file = run.v_dir / artifacts.SPLIT_FILE
    if split_file.is_file():
        train = set(storage.read_json(split_file).get("train", []))
    else:
        train = {p.name for p in datasets.split_episodes(paths, run.cfg.vae.heldout_fraction, run.cfg.vae.split_seed)[0]}
    return sum(p.name in train for p in evaluated)


# --------------------------------------------------------------------------- image metrics (numpy only)


def _float_frames(frames, name: str = "frames") -> np.ndarray:
    """(N, H, W, 3) uint8 (0..255) or float in [0, 1] -> float64 in [0, 1]."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or min(array.shape[1:3]) < 3:
        raise ValueError(f"{name} must have shape (N, H, W, 3) with H, W >= 3, got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be uint8 (0..255) or float in [0, 1], got dtype {array.dtype}")
    if array.size and (array.min() < -1e-3 or array.max() > 1.0 + 1e-3):
        raise ValueError(f"float {name} must lie in [0, 1], got [{array.min()}, {array.max()}]; divide by 255")
    return array.astype(np.float64)


def luma(frames) -> np.ndarray:
    """Grey image: (N, H, W, 3) uint8 or float in [0, 1] -> float64 (N, H, W), 0.299 R + 0.587 G + 0.114 B."""
    return _float_frames(frames) @ LUMA


def filter3x3(grey: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate (N, H, W) with a 3x3 kernel over the valid region -> (N, H - 2, W - 2), by numpy slicing."""
    grey = np.asarray(grey, dtype=np.float64)
    if grey.ndim != 3 or min(grey.shape[1:]) < 3:
        raise ValueError(f"grey images must have shape (N, H, W) with H, W >= 3, got {grey.shape}")
    h, w = grey.shape[1] - 2, grey.shape[2] - 2
    out = np.zeros((grey.shape[0], h, w))
    for i in range(3):
        for j in range(3):
            if kernel[i, j]:
                out += kernel[i, j] * grey[:, i:i + h, j:j + w]
    return out


def edge_mask(frames, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Edge pixels of frames: bool (N, H, W), True where the Sobel magnitude of the luma exceeds ``threshold``.

    The 1-pixel border, where the 3x3 neighbourhood is incomplete, is never an edge.
    """
    grey = luma(frames)
    magnitude = np.hypot(filter3x3(grey, SOBEL_X), filter3x3(grey, SOBEL_X.T))
    mask = np.zeros(grey.shape, dtype=bool)
    mask[:, 1:-1, 1:-1] = magnitude > threshold
    return mask


def edge_squared_error(originals, reconstructions, mask: np.ndarray | None = None,
                       threshold: float = EDGE_THRESHOLD) -> tuple[float, int]:
    """``(sum of squared errors, number of values)`` over the edge pixels of ``originals`` (3 channels each).

    ``mask`` (N, H, W) may be passed when it is already computed (it depends on the originals only).
    """
    a, b = _float_frames(originals, "originals"), _float_frames(reconstructions, "reconstructions")
    if a.shape != b.shape:
        raise ValueError(f"originals and reconstructions must have one shape, got {a.shape} and {b.shape}")
    mask = edge_mask(a, threshold) if mask is None else mask
    return float(np.square(a - b)[mask].sum()), int(mask.sum()) * a.shape[-1]


def edge_mse(originals, reconstructions, threshold: float = EDGE_THRESHOLD) -> float:
    """Mean squared error on the edge pixels of ``originals`` (:func:`edge_mask`); ValueError if there are none."""
    total, count = edge_squared_error(originals, reconstructions, threshold=threshold)
    if count == 0:
        raise ValueError(f"the originals have no edge pixel at threshold {threshold}")
    return total / count


def laplacian_variance(frames) -> np.ndarray:
    """Per-frame variance of the Laplacian of the luma: (N, H, W, 3) -> float64 (N,). Larger is sharper."""
    return filter3x3(luma(frames), LAPLACIAN).reshape(len(frames), -1).var(axis=1)


def sharpness_ratio(originals, reconstructions) -> float:
    """mean(laplacian_variance(reconstructions)) / mean(laplacian_variance(originals)): 1.0 = as sharp as real."""
    real = laplacian_variance(originals).mean()
    if real <= 0:
        raise ValueError("the originals are flat (zero Laplacian variance): sharpness relative to them is undefined")
    return float(laplacian_variance(reconstructions).mean() / real)


# --------------------------------------------------------------------------- evaluation


def load_models(runs: Sequence[Run]) -> dict:
    """``{run name: trained V}``, loaded through ``artifacts.load_vision`` (config checks included)."""
    return {run.name: artifacts.load_vision(run.data_dir, run.cfg) for run in runs}


def _batches(paths: Sequence[Path], batch_size: int):
    """uint8 (B, 64, 64, 3) batches of every frame of ``paths`` in order, one episode in memory at a time."""
    for path in paths:
        obs = storage.load_episode(path, keys=("obs",))["obs"]
        for start in range(0, len(obs), batch_size):
            yield obs[start:start + batch_size]


def evaluate_runs(models: Mapping[str, object], paths: Sequence[Path], batch_size: int = 100,
                  threshold: float = EDGE_THRESHOLD, log: Callable[[str], None] | None = None) -> dict:
    """Every model's metrics on every frame of ``paths``, streamed; the originals' statistics are shared.

    Returns ``{"frames", "frames_sha256", "edge_pixel_fraction", "laplacian_variance_real", "runs": {name: metrics}}``
    (``frames_sha256``: SHA-256 of the evaluated uint8 frames in order, so a later comparison can prove
    it scored the very same pixels)
    with metrics ``reconstruction_mse``, ``psnr_db``, ``edge_mse``, ``sharpness``,
    ``laplacian_variance``, ``kl_per_frame``, ``kl_per_dimension``, ``active_dimensions``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    frames, pixels, edge_pixels, real_lap = 0, 0, 0, 0.0
    digest = hashlib.sha256()
    # V's own metrics (as stage 2 reports them) come from metrics.VisionTotals; the sharper ones are summed here.
    totals = {name: metrics.VisionTotals() for name in models}
    sums = {name: {"edge": 0.0, "lap": 0.0} for name in models}
    for batch in _batches(paths, batch_size):
        n = len(batch)
        digest.update(np.ascontiguousarray(batch).tobytes())
        mask = edge_mask(batch, threshold)
        edge_pixels += int(mask.sum())
        pixels += mask.size
        real_lap += float(laplacian_variance(batch).sum())
        for name, model in models.items():
            mu, logvar = model.encode(batch)
            reconstruction = model.decode(mu)
            totals[name].add(batch, reconstruction, mu, logvar)
            sums[name]["edge"] += edge_squared_error(batch, reconstruction, mask)[0]
            sums[name]["lap"] += float(laplacian_variance(reconstruction).sum())
        frames += n
        if log is not None and frames % (batch_size * 50) < n:
            log(f"{frames} frames evaluated")
    if frames == 0:
        raise storage.MissingDataError("the evaluation episodes hold no frames")
    edge_values = edge_pixels * 3
    results = {}
    for name, acc in sums.items():
        vision = totals[name].result()
        results[name] = {
            "reconstruction_mse": vision["reconstruction_mse"],
            "psnr_db": vision["psnr_db"],
            "edge_mse": acc["edge"] / edge_values if edge_values else None,
            "sharpness": acc["lap"] / real_lap if real_lap > 0 else None,
            "laplacian_variance": acc["lap"] / frames,
            "kl_per_frame": vision["kl_per_frame"],
            "kl_per_dimension": vision["kl_per_dimension"],
            "active_dimensions": vision["active_dimensions"],
        }
    return {"frames": frames, "frames_sha256": digest.hexdigest(), "edge_pixel_fraction": edge_pixels / pixels,
            "laplacian_variance_real": real_lap / frames, "runs": results}


def _stage_metrics(run: Run, folder: str, keys: Sequence[str]) -> dict | str:
    """``keys`` of ``<data>/<folder>/metrics.json`` if that stage used this run's V, else ``"not run"``."""
    stage = run.data_dir / folder
    if not (stage / artifacts.METRICS_FILE).is_file() or not (stage / artifacts.CONFIG_FILE).is_file():
        return NOT_RUN
    used = config.load_config(stage / artifacts.CONFIG_FILE)
    # In a data dir with both V side by side, M and C belong to the V they were made with only.
    if any(config.get(used, k) != config.get(run.cfg, k) for k in artifacts.VISION_KEYS):
        return NOT_RUN
    saved = storage.read_json(stage / artifacts.METRICS_FILE)
    return {k: saved.get(k) for k in keys}


def downstream_metrics(run: Run) -> dict:
    """``{"rnn": {z_nll, z_nll_sampled, ...} | "not run", "controller": {mean, std, episodes, ...} | "not run"}``.

    ``rnn["z_nll_sampled_baseline"]`` is the better of 04's two baselines (persistence, unconditional
    Gaussian) on sampled z, or None. M's NLL alone does not compare across V: it depends on how each V
    spreads its latents (posterior widths, how many dimensions stay prior-like), which a baseline
    fitted to the same latents sees too. The gain over that baseline is what M adds, and it compares.
    """
    rnn = _stage_metrics(run, artifacts.RNN[0], ("z_nll", "z_nll_sampled", "evaluated_on", "evaluated_episodes",
                                                 "steps", "baselines"))
    if isinstance(rnn, dict):
        baselines = rnn.pop("baselines")
        sampled = baselines.get("sampled") if isinstance(baselines, dict) else None
        rnn["z_nll_sampled_baseline"] = min(sampled.values()) if isinstance(sampled, dict) and sampled else None
    return {
        "rnn": rnn,
        "controller": _stage_metrics(run, artifacts.CONTROLLER,
                                     ("mean", "std", "episodes", "generation", "max_steps")),
    }


def _numbers(run_result: dict) -> dict:
    """The aggregated numbers of one run (missing downstream stages left out)."""
    out = {k: run_result[k] for k in ("reconstruction_mse", "psnr_db", "edge_mse", "sharpness", "kl_per_frame",
                                      "active_dimensions") if run_result.get(k) is not None}
    if isinstance(run_result["rnn"], dict):
        rnn = run_result["rnn"]
        out.update({k: rnn[k] for k in ("z_nll", "z_nll_sampled") if rnn[k] is not None})
        if rnn.get("z_nll_sampled_baseline") is not None and rnn["z_nll_sampled"] is not None:
            out["z_nll_sampled_gain"] = rnn["z_nll_sampled_baseline"] - rnn["z_nll_sampled"]
    if isinstance(run_result["controller"], dict) and run_result["controller"]["mean"] is not None:
        out["controller_score"] = run_result["controller"]["mean"]
    return out


def aggregate(run_results: Sequence[dict]) -> dict:
    """Group runs by V kind: ``{kind: {"runs": [names], metric: {"mean", "std" (ddof 1; None for one run), "n"}}}``."""
    by_kind: dict[str, dict] = {}
    for result in run_results:
        group = by_kind.setdefault(result["kind"], {"runs": [], "values": {}})
        group["runs"].append(result["name"])
        for key, value in _numbers(result).items():
            group["values"].setdefault(key, []).append(float(value))
    out = {}
    for kind, group in by_kind.items():
        out[kind] = {"runs": group["runs"]}
        for key, values in group["values"].items():
            out[kind][key] = {"mean": float(np.mean(values)),
                              "std": float(np.std(values, ddof=1)) if len(values) > 1 else None, "n": len(values)}
    return out


# --------------------------------------------------------------------------- earlier comparisons

# What must agree for runs measured by an earlier comparison to join this one's tables.
_SAME_EVALUATION = ("episodes", "frames", "frames_sha256", "edge_threshold")


def load_previous(path: str | os.PathLike, evaluation: Mapping) -> list[dict]:
    """The runs of an earlier ``comparison.json`` at ``path``, after checking it scored the very same frames.

    Runs of one V kind that take an hour each need not be measured in one sitting: a comparison
    made on another day (on rollouts regenerated from the same seeds) joins this one when its
    held-out episodes, frame count, SHA-256 of the frames and edge threshold equal ``evaluation``'s.
    Each returned run gets ``"source": str(path)``; runs merged into that file earlier keep theirs.

    Raises:
        storage.MissingDataError: no such file.
        config.ConfigError: the file is not a comparison, or it was measured on other frames.
    """
    path = Path(path)
    if not path.is_file():
        raise storage.MissingDataError(f"--previous: no file {path}")
    previous = storage.read_json(path)
    if not isinstance(previous, dict) or not isinstance(previous.get("evaluation"), dict) \
            or not isinstance(previous.get("runs"), list):
        raise config.ConfigError(f"--previous: {path} is not a comparison.json written by vae_gan.compare")
    earlier = previous["evaluation"]
    if "frames_sha256" not in earlier:
        raise config.ConfigError(f"--previous: {path} predates frame fingerprints (no frames_sha256); "
                                 "measure its runs again with this version of vae_gan.compare")
    for key in _SAME_EVALUATION:
        if earlier.get(key) != evaluation.get(key):
            what = {"episodes": "held-out episodes", "frames": "number of frames",
                    "frames_sha256": "frame contents (SHA-256)", "edge_threshold": "edge threshold"}[key]
            raise config.ConfigError(
                f"--previous: {path} was measured on other frames than this comparison (its {what} differ); "
                "runs join only when they scored identical held-out frames (same rollouts, vae.split_seed, "
                "vae.heldout_fraction, --max-episodes and --edge-threshold)")
    return [{**run, "source": run.get("source", str(path))} for run in previous["runs"]]


# --------------------------------------------------------------------------- reports


def _fmt(value, digits: int, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def _run_row(result: dict) -> list[str]:
    rnn, controller = result["rnn"], result["controller"]
    nll = NOT_RUN if rnn == NOT_RUN else f"{_fmt(rnn['z_nll'], 3)} / {_fmt(rnn['z_nll_sampled'], 3)}"
    if rnn != NOT_RUN and rnn.get("z_nll_sampled_baseline") is not None:
        nll += f" (baseline {_fmt(rnn['z_nll_sampled_baseline'], 3)})"
    score = (NOT_RUN if controller == NOT_RUN else
             f"{_fmt(controller['mean'], 1)} ± {_fmt(controller['std'], 1)} ({controller['episodes']} tracks)")
    seen = result["heldout_episodes_seen_in_training"]
    return [result["name"] + (f" (trained on {seen} evaluated episode(s))" if seen else ""), result["kind"],
            _fmt(result["reconstruction_mse"], 5), _fmt(result["psnr_db"], 2), _fmt(result["edge_mse"], 5),
            _fmt(result["sharpness"], 3), _fmt(result["kl_per_frame"], 2),
            f"{result['active_dimensions']}/{result['z_size']}", nll, score]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_report(comparison: dict) -> str:
    """``comparison.md``: what was evaluated, one row per run, and (for kinds with several runs) mean ± std per kind."""
    ev = comparison["evaluation"]
    lines = [f"Evaluated on {ev['frames']} frames of {len(ev['episodes'])} held-out episode(s) "
             f"(the split of run {ev['split_of']!r}); {100 * ev['edge_pixel_fraction']:.1f}% of the pixels are "
             f"edge pixels (Sobel magnitude of the luma > {ev['edge_threshold']}).", ""]
    header = ["run", "V", "MSE", "PSNR (dB)", "edge MSE", "sharpness", "KL (nats/frame)", "active dims",
              "M z NLL (mu / sampled)", "C score (real)"]
    lines += _table(header, [_run_row(r) for r in comparison["runs"]])
    merged = [r for r in comparison["runs"] if r.get("source")]
    if merged:
        lines += ["", f"Measured earlier on the same frames (SHA-256 {ev['frames_sha256'][:12]}...) and merged with "
                  "--previous: " + "; ".join(f"{r['name']} ({r['source']}, {r.get('measured_at', 'date unknown')})"
                                             for r in merged) + "."]
    if any(len(group["runs"]) > 1 for group in comparison["by_kind"].values()):
        lines += ["", "Mean ± std (ddof 1) over the runs of each V kind; (k/n) when only k of n runs have the number.",
                  ""]
        rows = []
        for kind, group in comparison["by_kind"].items():
            cells = [kind, f"{len(group['runs'])} ({', '.join(group['runs'])})"]
            for key in AGGREGATED:
                stat = group.get(key)
                if stat is None:
                    cells.append(NOT_RUN)
                    continue
                text = _fmt(stat["mean"], _DIGITS[key])
                text += "" if stat["std"] is None else f" ± {_fmt(stat['std'], _DIGITS[key])}"
                cells.append(text + ("" if stat["n"] == len(group["runs"]) else f" ({stat['n']}/{len(group['runs'])})"))
            rows.append(cells)
        lines += _table(["V", "runs", *AGGREGATED.values()], rows)
    lines += ["", "MSE and PSNR: posterior-mean reconstructions, frames in [0, 1]. Sharpness: variance of the "
              "Laplacian of the reconstructions / of the real frames (1 = as sharp). KL per frame and active "
              "dimensions (posterior-mean variance > 0.01) as in V's metrics.json. M: held-out NLL in nats per z "
              "dimension per step; baseline: the better of 04's persistence and unconditional baselines on the "
              "same sampled z, and M's gain is baseline minus M (what M predicts beyond them; unlike the NLL "
              "itself, comparable between V whose latents carry different amounts of information). C: mean ± "
              "std of the real score over held-out tracks."]
    return "\n".join(lines) + "\n"


def compare(runs: Sequence[Run], out: Path | None = None, batch_size: int = 100, max_episodes: int | None = None,
            threshold: float = EDGE_THRESHOLD, log: Callable[[str], None] = print,
            previous: Sequence[str | os.PathLike] = ()) -> dict:
    """Check, evaluate and report ``runs``; write comparison.json, comparison.md, reconstructions.png to ``out``.

    ``out`` defaults to ``<first run's data dir>/compare``; ``max_episodes`` keeps the first N evaluation
    episodes (by name). ``previous``: earlier comparison.json files whose runs join the tables
    (:func:`load_previous`; the image grid shows this call's runs only). Returns the content of
    comparison.json plus ``"markdown"`` and ``"out"``.
    """
    runs = check_names(runs)
    if max_episodes is not None and max_episodes < 1:
        raise ValueError(f"max_episodes must be >= 1, got {max_episodes}")
    paths = check_same_rollouts(runs)
    evaluated = evaluation_episodes(runs, paths)[:max_episodes]
    datasets.check_episodes(evaluated)
    out = Path(out) if out is not None else runs[0].data_dir / artifacts.COMPARE
    log(f"[compare] {len(runs)} run(s) on {len(evaluated)} held-out episode(s) of "
        f"{artifacts.rollouts_dir(runs[0].data_dir)}")
    models = load_models(runs)
    measured = evaluate_runs(models, evaluated, batch_size, threshold, log=lambda m: log(f"[compare] {m}"))
    measured_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results = []
    for run in runs:
        results.append({
            "name": run.name, "kind": run.kind, "data_dir": str(run.data_dir), "v_dir": str(run.v_dir),
            "z_size": run.cfg.vae.z_size, "vae_seed": run.cfg.vae.seed,
            "heldout_episodes_seen_in_training": episodes_seen_in_training(run, evaluated, paths),
            **measured["runs"][run.name], **downstream_metrics(run), "measured_at": measured_at,
        })
    evaluation = {
        "split_of": runs[0].name, "episodes": [p.name for p in evaluated], "frames": measured["frames"],
        "frames_sha256": measured["frames_sha256"], "edge_threshold": threshold,
        "edge_pixel_fraction": measured["edge_pixel_fraction"],
        "laplacian_variance_real": measured["laplacian_variance_real"],
    }
    for path in previous:
        results += load_previous(path, evaluation)
    clashes = _repeated([r["name"] for r in results])
    if clashes:
        raise config.ConfigError(f"run name(s) {', '.join(clashes)} appear both here and in --previous "
                                 "(or twice in --previous); rename this call's runs")
    comparison = {
        "evaluation": evaluation,
        "runs": results,
        "by_kind": aggregate(results),
    }
    markdown = markdown_report(comparison)
    storage.atomic_write_json(out / "comparison.json", comparison)
    storage.atomic_write_text(out / "comparison.md", markdown)
    figures.reconstruction_grid(models, metrics.grid_frames(evaluated[0]), out / "reconstructions.png")
    return {**comparison, "markdown": markdown, "out": str(out)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR",
                        help="a run: a data dir with one trained V, or a V folder (D/vae, D/vae_gan); repeatable")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="without --run: compare every V in this data dir (default: $WORLDMODELS_DATA or data)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first data dir>/compare)")
    parser.add_argument("--batch-size", type=int, default=100, help="frames per model call (default: 100)")
    parser.add_argument("--max-episodes", type=int, default=None, help="evaluate the first N held-out episodes only")
    parser.add_argument("--previous", action="append", default=[], type=Path, metavar="COMPARISON_JSON",
                        help="an earlier comparison.json measured on the same frames: its runs join the tables "
                             "(repeatable)")
    parser.add_argument("--edge-threshold", type=float, default=EDGE_THRESHOLD,
                        help=f"Sobel magnitude of the luma that makes an edge pixel (default: {EDGE_THRESHOLD})")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_episodes is not None and args.max_episodes < 1):
        parser.error("--batch-size and --max-episodes must be >= 1")
    if args.run and args.data_dir is not None:
        parser.error("give either --run NAME=DIR (repeatable) or --data-dir, not both")
    if args.run:
        runs = check_names([parse_run(spec) for spec in args.run])
    else:
        runs = runs_in_data_dir(args.data_dir or Path(os.environ.get("WORLDMODELS_DATA", "data")))
    result = compare(runs, args.out, args.batch_size, args.max_episodes, args.edge_threshold, previous=args.previous)
    print(result["markdown"], end="")
    print(f"[compare] wrote comparison.json, comparison.md and reconstructions.png to {result['out']}")
    return 0


def console() -> None:
    """The ``wm-compare`` command of ``pip install -e .``: :func:`main` with one-line user errors."""
    cli.run(main)


if __name__ == "__main__":
    console()
