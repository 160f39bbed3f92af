"""Stage 5 as a library: evolve C with CMA-ES in the real CarRacing-v3 or in M's dream.

:func:`train_controller` is what ``05_train_controller.py`` runs and what
``study_temperature.py`` runs once per temperature.

Every generation CMA-ES proposes ``controller.population`` controllers, and each drives
``controller.rollouts_per_member`` episodes; its fitness is the mean return. The training
tracks (dream seeds in the dream) are drawn from the search's own random stream, the same
tracks for every member of a generation, so members are ranked on equal terms. All episodes
of a generation run at once through :func:`worldmodels.rollout.run_episodes`:

* ``controller.env='real'``: in a pool of CarRacing workers with one batched V, M and C call
  per step (:class:`~worldmodels.rollout.RealWorld`); at most ``max_concurrent`` envs.
* ``controller.env='dream'``: in M's dream (:class:`~worldmodels.dream.DreamWorld`),
  ``dream.batch_size`` agents per compiled step, ``dream.max_steps`` steps, temperature
  ``dream.temperature``, starts from the real frames in ``<data>/series/``.

Cheaper training episodes (never cheaper evaluations): ``controller.patience`` stops a real
training episode after that many steps without a new tile and books the rest at -0.1 a step
(:func:`rollout.run_episodes`); ``controller.racing`` lets every member drive the first track
and only the better half the others (:func:`race`, which says how the eliminated are ranked).
``controller.z_input`` is what C and M see of V's posterior (:class:`rollout.RealWorld`).
Training episodes draw ``env.observation`` (the fast renderer of :mod:`worldmodels.fast_render`
when 'fast', :func:`training_observation`); every held-out and final evaluation runs on a pool of
its own with gymnasium's stock pixels.

Every ``controller.eval_every`` generations (and after the last) the CMA mean is scored on
``controller.eval_episodes`` fixed held-out tracks of the *real* environment; when training
in the dream it is also scored on as many held-out dream episodes. The best-scoring mean is
kept as the controller (``params``). The score that selects it is the one of the world it
trains in: the real score for real training, the *dream* score for dream training - a
controller trained in the dream never sees the real environment, and the real scores are
only watched (so the temperature study shows honestly what each dream is worth). At the end
``params`` is scored on ``controller.final_eval_episodes`` further held-out real tracks (the
reported score, ``metrics.json``); a dream-trained one also on as many held-out dream episodes.

Output folder: ``<data>/controller/`` for real training and
``<data>/controller_dream_t<tau>/`` for dream training (``tau`` as ``%g``: 1.15 -> ``t1.15``,
1.0 -> ``t1``), so the real-trained controller and one dream controller per temperature
live side by side. The hybrid (issue #19): with ``controller.init_from`` naming another controller
(e.g. ``controller_dream_t1.15``, relative to the data dir), a real search starts its CMA mean at that
controller's ``params`` (:func:`start_params`) and writes ``<data>/controller_hybrid/``, whose
``config.json`` records the start (a resume from another start is refused) and whose ``metrics.json``
names it, so a dream-trained C fine-tuned in reality is reported apart from pure dream training. Each holds ``config.json``, ``evolution.pkl``, ``history.csv`` (per
generation: best, mean, std, worst fitness - dream returns when training in the dream -
sigma, elapsed seconds and the environment steps it took), ``eval.csv`` (generation, mean,
std on the real held-out tracks, and the evaluation's env_steps and seconds; plus
dream_mean, dream_std for dream training), ``controller.npz`` (``params``: the selected CMA
mean; ``mean``: the current CMA mean; ``best_member``), ``learning_curve.png``, ``logs/``
(TensorBoard) and ``metrics.json``.

Resumable: the search is checkpointed after every generation (``worldmodels.evolution``);
after Ctrl-C or SIGKILL the same call continues to the same result as an uninterrupted run
(the dream is reproducible per agent from its seed, see ``worldmodels.dream``). A finished
run reruns as a no-op; a larger ``controller.generations`` continues it.

TensorFlow (and the dream) are imported inside :func:`train_controller`, after the checks,
so that a missing model is reported at once and spawned environment workers stay small.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import artifacts, envpool, rollout, storage
from worldmodels.evolution import CHECKPOINT_NAME, Evolution

COMPATIBLE_KEYS = artifacts.CONTROLLER_KEYS
DREAM_KEYS = artifacts.DREAM_KEYS
EVAL_NAME = "eval.csv"
# env_steps and seconds: what the evaluation cost (nan in rows of older files).
EVAL_FIELDS = ("generation", "mean", "std", "env_steps", "seconds")
DREAM_EVAL_FIELDS = EVAL_FIELDS[:3] + ("dream_mean", "dream_std") + EVAL_FIELDS[3:]
CONTROLLER_NAME = artifacts.CONTROLLER_FILE
METRICS_NAME = artifacts.METRICS_FILE
DEFAULT_MAX_CONCURRENT = 256


def output_dir(data_dir, cfg: config.Config) -> Path:
    """``<data>/controller`` (real) or ``<data>/controller_dream_t<tau:g>`` (dream)."""
    return artifacts.controller_dir(data_dir, cfg)


def compatible_keys(cfg: config.Config) -> tuple[str, ...]:
    return artifacts.controller_keys(cfg)


def training_tracks(rng: np.random.Generator, count: int, exclude: np.ndarray) -> np.ndarray:
    """``count`` track seeds from ``rng``, redrawing any that is a held-out track (never train on those)."""
    seeds = rng.integers(0, 2**31, size=count)
    clash = np.isin(seeds, exclude)
    while clash.any():
        seeds[clash] = rng.integers(0, 2**31, size=int(clash.sum()))
        clash = np.isin(seeds, exclude)
    return seeds


# --------------------------------------------------------------------------- files


def read_evals(path) -> dict[int, dict[str, float]]:
    """``eval.csv`` -> {generation: {"mean", "std"[, "dream_mean", "dream_std"]}}; damaged: CorruptFileError."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        with open(path, newline="") as f:
            return {int(row["generation"]): {key: float(value) if value != "" else math.nan
                                             for key, value in row.items() if key != "generation"}
                    for row in csv.DictReader(f)}
    except (KeyError, TypeError, ValueError) as exc:
        raise storage.CorruptFileError(f"{path} is not a valid evaluation log ({exc}); delete it to redo "
                                       "the held-out evaluations of the current CMA mean only") from exc


def write_evals(path, evals: dict, fields=EVAL_FIELDS) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows([g] + [row.get(key, math.nan) for key in fields[1:]] for g, row in sorted(evals.items()))
    storage.atomic_write_text(path, buffer.getvalue())


def read_best(path, num_params: int):
    """The best held-out mean so far from ``controller.npz``: (generation, score, params) or None."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            generation = int(data["best_eval_generation"])
            score = float(data["best_eval_mean"])
            params = np.array(data["params"], dtype=np.float64)
    except Exception as exc:  # zip, zlib, key and value errors all mean the same here
        raise storage.CorruptFileError(f"{path} cannot be read ({type(exc).__name__}: {exc}); delete it "
                                       "(the best held-out controller is then chosen from later evaluations)") from exc
    if params.shape != (num_params,):
        raise storage.CorruptFileError(f"{path} holds {params.shape} parameters, expected ({num_params},)")
    return (generation, score, params) if generation >= 0 else None


def save_controller(path, evolution: Evolution, best, z_size: int, hidden: int) -> None:
    mean = evolution.mean
    member = evolution.best_solution
    storage.save_npz(path, {
        "params": best[2] if best else mean,
        "mean": mean,
        "best_member": mean if member is None else member,
        "generation": np.int64(evolution.generation),
        "best_eval_generation": np.int64(best[0] if best else -1),
        "best_eval_mean": np.float64(best[1] if best else math.nan),
        "z_size": np.int64(z_size),
        "hidden_size": np.int64(hidden),
    })


def _number(value) -> float:
    """A history or evaluation cell as a number: missing or empty (older files) counts as 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return 0.0 if math.isnan(value) else value


def search_cost(history: list[dict], evals: dict, real_training: bool = True) -> dict[int, tuple[int, float]]:
    """What the search had cost when each evaluation was made: {generation: (env_steps, seconds)}.

    Real environment steps of training (history ``env_steps``; only with ``real_training``: a search in
    the dream records dream steps there, which are not real) and of the held-out evaluations
    (``eval.csv``) up to and including that generation's evaluation; seconds likewise: the time
    spent in generations (history ``elapsed``, summed over restarts) plus the evaluations'. Rows
    of older files without these columns count as 0.
    """
    steps_by_generation, elapsed = {}, {}
    total = 0.0
    for row in history:
        total += _number(row.get("env_steps")) if real_training else 0.0
        steps_by_generation[int(row["generation"])] = total
        elapsed[int(row["generation"])] = _number(row.get("elapsed"))
    cost, eval_steps, eval_seconds = {}, 0.0, 0.0
    for g in sorted(evals):
        eval_steps += _number(evals[g].get("env_steps"))
        eval_seconds += _number(evals[g].get("seconds"))
        cost[g] = (int(steps_by_generation.get(g, total) + eval_steps), elapsed.get(g, 0.0) + eval_seconds)
    return cost


def search_table(folder, cores: int | None = None) -> str:
    """The held-out evaluations of the search in ``folder`` as a markdown table, one row per evaluation.

    Columns: generation, held-out mean +- std (``controller.eval_episodes`` tracks of the search's
    ``config.json``), the real environment steps and the wall time spent so far (:func:`search_cost`:
    generations plus evaluations, summed over restarts), and with ``cores`` the core-hours (wall time x
    ``cores``: the cores of the machine the search ran on, which the files do not record). Reads
    ``history.csv``, ``eval.csv`` and ``config.json`` only, so it works on a carry as on a data folder.
    """
    folder = Path(folder)
    if not (folder / "history.csv").is_file():
        raise storage.MissingDataError(f"{folder / 'history.csv'} is missing: {folder} holds no search "
                                       "(run 05_train_controller.py, or restore a carry)")
    if cores is not None and cores < 1:
        raise ValueError(f"cores must be a positive number of CPU cores, got {cores!r}")
    evals = read_evals(folder / EVAL_NAME)
    saved = folder / artifacts.CONFIG_FILE
    cfg = config.load_config(saved) if saved.is_file() else None
    try:
        with open(folder / "history.csv", newline="") as f:
            real = cfg is None or cfg.controller.env != "dream"  # a dream search's history counts dream steps
            cost = search_cost(list(csv.DictReader(f)), evals, real_training=real)
    except (KeyError, TypeError, ValueError) as exc:
        raise storage.CorruptFileError(f"{folder / 'history.csv'} is not a search history ({exc})") from exc
    tracks = cfg.controller.eval_episodes if cfg is not None else "?"
    head = ["generation", f"held-out mean ± std ({tracks} tracks)", "real env steps (training + evaluations)",
            "wall time"] + ([f"core-hours ({cores} cores)"] if cores else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for g in sorted(evals):
        steps, seconds = cost[g]
        row = [str(g), f"{evals[g]['mean']:.1f} ± {evals[g]['std']:.1f}", f"{steps / 1e6:.2f} M", f"{seconds / 3600:.2f} h"]
        row += [f"{seconds * cores / 3600:.1f}"] if cores else []
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_learning_curve(path, history: list[dict], evals: dict, dream_temperature: float | None = None) -> None:
    """Fitness per generation and the held-out evaluations (real, and dream if any) against generations,
    real environment steps and wall time (:func:`search_cost`), as a PNG (atomically)."""
    import matplotlib.ticker
    from matplotlib.figure import Figure

    where = "training tracks" if dream_temperature is None else f"dream, tau={dream_temperature:g}"
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3, sharey=True)
    ax = axes[0]
    generations = [row["generation"] for row in history]
    ax.plot(generations, [row["best"] for row in history], label=f"best member ({where})")
    ax.plot(generations, [row["mean"] for row in history], label=f"population mean ({where})")
    g = sorted(evals)
    cost = search_cost(history, evals, real_training=dream_temperature is None)
    # One colour per kind of evaluation in all three panels (the first panel's two fitness lines take C0, C1).
    for axis, x in ((axes[0], g), (axes[1], [cost[i][0] for i in g]), (axes[2], [cost[i][1] / 3600 for i in g])):
        if not g:
            continue
        axis.errorbar(x, [evals[i]["mean"] for i in g], yerr=[evals[i]["std"] for i in g], fmt="o-", capsize=3,
                      color="C2", label="CMA mean on held-out real tracks (+- std)")
        if dream_temperature is not None:
            axis.errorbar(x, [evals[i]["dream_mean"] for i in g], yerr=[evals[i]["dream_std"] for i in g],
                          fmt="s--", capsize=3, color="C3", label="CMA mean on held-out dream episodes (+- std)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    axes[1].set_xlabel("real environment steps (training + evaluations)" if dream_temperature is None else
                       "real environment steps (held-out evaluations; the dream's steps are not real)")
    axes[2].set_xlabel("wall time of generations + evaluations (hours)")
    if dream_temperature is not None:
        ax.set_title(f"controller trained in the dream (tau={dream_temperature:g})", fontsize=10)
    for axis in axes:
        axis.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    storage.save_figure(fig, path, dpi=100)


def final_metrics_done(path, generation: int, episodes: int, max_steps: int) -> bool:
    try:
        old = storage.read_json(path)
    except (storage.MissingDataError, storage.CorruptFileError):
        return False
    return (old.get("generation"), old.get("episodes"), old.get("max_steps")) == (generation, episodes, max_steps)


def start_params(cfg: config.Config, data_dir) -> tuple[np.ndarray, Path]:
    """``(params (N,), path)`` of the controller ``controller.init_from`` names (a folder or its ``controller.npz``,
    relative to ``data_dir``), which must have been trained with ``data_dir``'s M (C reads that M's h)."""
    path = artifacts.controller_file(Path(data_dir) / cfg.controller.init_from)
    params, _ = artifacts.load_controller(path, "params", cfg.vae.z_size, cfg.rnn.hidden_units)
    trained_in = artifacts.rnn_path(path.parent.parent)
    if not trained_in.is_file() or trained_in.resolve() != artifacts.rnn_path(data_dir).resolve():
        raise config.ConfigError(f"controller.init_from={cfg.controller.init_from!r}: {path} was trained with the M of "
                                 f"{trained_in}, not with this data dir's {artifacts.rnn_path(data_dir)}; a search "
                                 "can only start from a controller of its own M (a controller folder of the data dir)")
    return params, path


def check_inputs(data_dir, cfg: config.Config) -> None:
    """Fail before the slow imports if V, M (or, for the dream, the latent series) are missing."""
    artifacts.require_models(data_dir, cfg)
    if cfg.controller.env == "dream":
        storage.list_episodes(Path(data_dir) / artifacts.SERIES, "latent series",
                              f"The dream starts from them; make them with: python {artifacts.MAKERS[artifacts.SERIES]}")
        for folder in ensemble_dirs(cfg):
            artifacts.require_rnn(folder, cfg)


def ensemble_dirs(cfg: config.Config) -> list[Path]:
    """The folders of ``dream.ensemble`` (comma-separated), each holding ``rnn/`` of a further M."""
    return artifacts.folder_list(cfg.dream.ensemble)


# --------------------------------------------------------------------------- one generation's fitness


def race(run, params: np.ndarray, tracks: np.ndarray, weight_decay: float = 0.0) -> tuple[np.ndarray, int]:
    """Racing (one round of successive halving): every member drives ``tracks[0]``, the better half the rest.

    Args:
        run: ``run(params (p, N), seeds (p, k)) -> Rollouts``, e.g. :func:`rollout.run_episodes` on a world.
        params: (P, N) the generation's members.
        tracks: (K,) the generation's track seeds, K >= 2, the same for every member.
        weight_decay: the search's ``controller.weight_decay`` (see below).

    Returns:
        ``(fitness (P,), env_steps)``. The ``ceil(P / 2)`` members with the highest return on the
        first track (ties: the lower index) drive the other K - 1 tracks too, and their fitness is
        their mean return over all K tracks, as without racing. An eliminated member has driven
        one track only, so its single return is not comparable with the survivors' means; it gets
        a fitness *below every survivor*, ordered among the eliminated by its first-track return:
        ``min(survivors' penalised fitness) - 1 - (worst survivor's first return - its first
        return)``, plus its own weight-decay penalty so that the *penalised* value cma ranks is
        exactly that. CMA-ES uses only the ranking: the survivors are the top half (cma's parents,
        mu = P / 2), ranked among themselves on all K tracks, and the eliminated rank below, in the
        order of their first track (which cma's active update uses). The history's mean and worst
        then include these ranking values.
    """
    params = np.asarray(params, dtype=np.float64)
    tracks = np.asarray(tracks)
    p_count, k = len(params), len(tracks)
    if k < 2:
        raise ValueError(f"racing needs at least 2 tracks per member, got {k}")
    first = run(params, np.full((p_count, 1), tracks[0], dtype=tracks.dtype))
    first_return = first.returns[:, 0]
    keep = p_count - p_count // 2
    order = np.argsort(-first_return, kind="stable")
    survivors, eliminated = np.sort(order[:keep]), order[keep:]
    rest = run(params[survivors], np.tile(tracks[1:], (keep, 1)))
    fitness = np.empty(p_count)
    fitness[survivors] = (first_return[survivors] + rest.returns.sum(axis=1)) / k
    penalty = weight_decay * np.sum(params * params, axis=1)
    floor = float(np.min(fitness[survivors] - penalty[survivors]))
    cutoff = float(first_return[survivors].min())
    fitness[eliminated] = floor - 1.0 - (cutoff - first_return[eliminated]) + penalty[eliminated]
    return fitness, int(first.lengths.sum() + rest.lengths.sum())


def generation_fitness(run, params: np.ndarray, tracks: np.ndarray, racing: bool,
                       weight_decay: float = 0.0) -> tuple[np.ndarray, int]:
    """``(fitness (P,), env_steps)`` of members ``params`` (P, N) on the shared ``tracks`` (K,): the mean
    return of each member over all K tracks, or with ``racing`` what :func:`race` defines."""
    if racing:
        return race(run, params, tracks, weight_decay)
    result = run(params, np.tile(tracks, (len(params), 1)))
    return result.returns.mean(axis=1), int(result.lengths.sum())


def training_observation(cfg: config.Config) -> str:
    """How the environments of *training* episodes draw their frames (``env.observation``).

    Evaluations always get 'stock': :func:`_open_pools` gives training a pool of its own when this
    differs, so every held-out and final score is about the pixels the paper's score is about.
    """
    return cfg.env.observation


# --------------------------------------------------------------------------- training


@dataclass
class Search:
    """What the steps of one search share (one object instead of closures over mutable dicts).

    ``evals`` and ``best`` (``(generation, score, params)`` or None) grow as the search runs;
    ``steps`` and ``seconds`` count this process's training steps and time, for the speed shown.
    """

    cfg: config.Config
    out: Path
    evolution: Evolution
    evals: dict
    best: tuple | None
    prefix: str
    world: object = None  # RealWorld of the held-out evaluations (stock observations)
    train_world: object = None  # where members are scored: the real world or the dream
    dream: object = None
    writer: object = None
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    series_dirs: list | None = None  # where a branched dream starts (None: <data>/series)
    steps: int = 0
    seconds: float = 0.0

    @property
    def in_dream(self) -> bool:
        return self.cfg.controller.env == "dream"

    @property
    def tau(self) -> float | None:
        return self.cfg.dream.temperature if self.in_dream else None

    @property
    def eval_seeds(self) -> np.ndarray:
        c = self.cfg.controller
        return rollout.heldout_seeds(c.seed, c.eval_episodes, rollout.EVAL_SEED_OFFSET)

    @property
    def final_seeds(self) -> np.ndarray:
        c = self.cfg.controller
        return rollout.heldout_seeds(c.seed, c.final_eval_episodes, rollout.FINAL_EVAL_SEED_OFFSET)

    def evaluation_due(self) -> bool:
        g, c = self.evolution.generation, self.cfg.controller
        return g > 0 and g not in self.evals and (g % c.eval_every == 0 or g == c.generations)

    def save(self) -> None:
        save_controller(self.out / CONTROLLER_NAME, self.evolution, self.best, self.cfg.vae.z_size,
                        self.cfg.rnn.hidden_units)

    def plot(self) -> None:
        plot_learning_curve(self.out / "learning_curve.png", self.evolution.history, self.evals, self.tau)


def parse_study_arguments(description: str, argv=None) -> tuple[config.Config, argparse.Namespace, str]:
    """``(cfg, args, command)`` of a script that runs several searches (``study_*.py``): the shared flags plus
    ``--max-concurrent`` (checked), and the command line as typed, for the results files."""
    parser = config.make_parser(description)
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                        help=f"at most N real environments at once (default {DEFAULT_MAX_CONCURRENT})")
    cfg, args = config.parse_args(description, argv, parser)
    if args.max_concurrent < 1:
        parser.error(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    command = shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    return cfg, args, command


def train_controller(cfg: config.Config, data_dir, *, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
                     final_eval: bool = True, command: str = "", models=None, prefix: str = "[05]",
                     out: Path | None = None, x0: np.ndarray | None = None,
                     series_dirs: list | None = None) -> dict:
    """Run (or resume, or do nothing if complete) the search of ``cfg`` in ``output_dir(data_dir, cfg)``.

    Args:
        cfg: the resolved config; ``controller.env`` says where members are scored.
        data_dir: folder holding ``vae/`` (or ``vae_gan/``), ``rnn/`` and, for the dream, ``series/``.
        max_concurrent: at most this many real environments at once (~4 MB each).
        final_eval: score the selected controller on the final held-out tracks (``metrics.json``).
        command: the command line recorded in ``metrics.json``.
        models: (V, M) already loaded, to skip loading them (e.g. once for a whole study).
        prefix: how log lines start.
        out: the output folder (default ``output_dir(data_dir, cfg)``; the iterations write their own).
        x0: the CMA-ES starting mean (N,) of a new search (default: the params of ``controller.init_from``
            if set, else zeros; ignored when resuming).
        series_dirs: the folders of series a branched dream (``dream.start_every > 0``) starts from
            (default ``<data_dir>/series``).

    Returns:
        ``{"out": Path, "generation": int, "evals": {generation: row}, "metrics": dict or None,
        "models": (V, M) or None}`` with ``metrics`` the content of ``metrics.json`` if it exists
        and ``models`` the models used (None if there was nothing to do), to pass on to a next call.
    """
    if int(max_concurrent) != max_concurrent or max_concurrent < 1:
        raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
    envpool.check_backend(cfg.controller.backend)  # e.g. Ray not installed: say so before any slow work
    check_inputs(data_dir, cfg)
    out = output_dir(data_dir, cfg) if out is None else Path(out)
    saved = out / artifacts.CONFIG_FILE
    if saved.exists():
        config.check_compatible(config.load_config(saved), cfg, compatible_keys(cfg), str(out))
    c = cfg.controller
    if x0 is None and c.init_from and not (out / CHECKPOINT_NAME).exists():  # a resume keeps its own mean
        x0, source = start_params(cfg, data_dir)
        print(f"{prefix} the search starts from the controller {source} (controller.init_from)")
    num_params = num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units)
    evolution = Evolution(num_params, out, popsize=c.population, sigma0=c.sigma_init, seed=c.seed,
                          weight_decay=c.weight_decay, x0=x0)
    config.save_config(cfg, out)
    search = Search(cfg, out, evolution, read_evals(out / EVAL_NAME), read_best(out / CONTROLLER_NAME, num_params),
                    prefix, max_concurrent=max_concurrent, series_dirs=series_dirs)
    g = evolution.generation
    final_done = not final_eval or final_metrics_done(out / METRICS_NAME, g, c.final_eval_episodes, c.max_steps)
    if not (g >= c.generations and not search.evaluation_due() and final_done):
        models = _run(search, data_dir, models=models, final_eval=final_eval, command=command)
    else:
        print(f"{prefix} {out}: all {g} generations and evaluations are complete; nothing to do")
    try:
        metrics = storage.read_json(out / METRICS_NAME)
    except storage.MissingDataError:
        metrics = None
    return {"out": out, "generation": evolution.generation, "evals": read_evals(out / EVAL_NAME), "metrics": metrics,
            "models": models}


def _run(search: Search, data_dir, *, models, final_eval: bool, command: str):
    """Load what the search needs, run its generations and evaluations, then the final evaluation; returns (V, M)."""
    import tensorflow as tf

    from worldmodels.devices import describe_devices

    cfg, c = search.cfg, search.cfg.controller
    print(f"{search.prefix} {describe_devices()}")
    vae, rnn = models if models is not None else rollout.load_world_models(data_dir, cfg)
    search.writer = tf.summary.create_file_writer(str(search.out / "logs"))
    if search.in_dream:
        search.dream = _open_dream(cfg, data_dir, rnn, search.prefix, search.series_dirs)
    num_envs = min(search.max_concurrent, max(c.eval_episodes, c.final_eval_episodes) if search.in_dream
                   else max(c.population * c.rollouts_per_member, c.eval_episodes, c.final_eval_episodes))
    options = (f"patience {c.patience}" if c.patience and not search.in_dream else "no early stop") + \
        (", racing" if c.racing else "") + f", z: {c.z_input}, {training_observation(cfg)} observation"
    train_where = (f"the dream ({cfg.dream.max_steps} steps, {search.dream.capacity} agents at once)"
                   if search.in_dream else f"{num_envs} envs on backend '{c.backend}' ({options})")
    print(f"{search.prefix} {search.out}: {search.evolution.generation} of {c.generations} generations done; "
          f"population {c.population} x {c.rollouts_per_member} episode(s) of <= "
          f"{cfg.dream.max_steps if search.in_dream else c.max_steps} steps in {train_where}")
    with _open_pools(cfg, num_envs, search.max_concurrent) as (train_pool, eval_pool):
        search.world = rollout.RealWorld(eval_pool, vae, rnn, c.z_input)
        search.train_world = (search.dream if search.in_dream else search.world if train_pool is eval_pool
                              else rollout.RealWorld(train_pool, vae, rnn, c.z_input))
        _evolve(search)
        if not final_eval:
            print(f"{search.prefix} done: {search.out / CONTROLLER_NAME} (final evaluation skipped)")
        elif final_metrics_done(search.out / METRICS_NAME, search.evolution.generation, c.final_eval_episodes,
                                c.max_steps):
            print(f"{search.prefix} done: final evaluation already in {search.out / METRICS_NAME}")
        else:
            _final_evaluation(search, command)
    return vae, rnn


def _open_dream(cfg, data_dir, rnn, prefix, series_dirs=None):
    from worldmodels import dream as dream_lib

    starts = dream_lib.start_states_for(data_dir, cfg, rnn, series_dirs)
    ensemble = [artifacts.load_rnn(folder, cfg) for folder in ensemble_dirs(cfg)]
    dream = dream_lib.dream_world(cfg, rnn, starts, ensemble=ensemble, pessimism=cfg.dream.pessimism)
    where = (f"every {cfg.dream.start_every} frames of each series from frame {cfg.dream.skip_initial_frames}, "
             f"{len(set(starts.episodes))} series"
             if cfg.dream.start_every else f"frame {cfg.dream.skip_initial_frames} of each series")
    print(f"{prefix} dream at temperature {cfg.dream.temperature:g}: {len(starts)} starting frames ({where}), "
          f"episodes of <= {dream.max_steps} steps, {dream.capacity} agents per step, "
          f"done head: {dream.done}, dropout masks: {dream.dropout}"
          + (f", {len(ensemble) + 1} Ms, reward minus {dream.pessimism:g} x their disagreement" if ensemble else ""))
    return dream


@contextlib.contextmanager
def _open_pools(cfg: config.Config, num_envs: int, max_concurrent: int):
    """``(training pool, evaluation pool)``: one pool for both while training sees the stock pixels too,
    else a training pool drawing :func:`training_observation` beside a stock one for the evaluations."""
    c = cfg.controller
    observation = training_observation(cfg)
    with contextlib.ExitStack() as stack:
        if observation == "stock":
            pool = stack.enter_context(envpool.CarRacingPool(num_envs, c.max_steps, c.backend, c.workers,
                                                             c.ray_address))
            yield pool, pool
            return
        eval_envs = min(max_concurrent, max(c.eval_episodes, c.final_eval_episodes))
        train_pool = stack.enter_context(envpool.CarRacingPool(num_envs, c.max_steps, c.backend, c.workers,
                                                               c.ray_address, observation=observation))
        eval_pool = stack.enter_context(envpool.CarRacingPool(eval_envs, c.max_steps, c.backend, c.workers,
                                                              c.ray_address))
        yield train_pool, eval_pool


def _evolve(search: Search) -> None:
    """The generations still to run, each followed by its held-out evaluation when one is due."""
    from tqdm import tqdm

    c = search.cfg.controller
    tau = search.tau
    with tqdm(total=c.generations, initial=min(search.evolution.generation, c.generations), unit="gen",
              desc="CMA-ES" + (f" (dream, tau={tau:g})" if tau is not None else ""), dynamic_ncols=True) as bar:
        _evaluate_mean(search, bar)  # an evaluation lost to a kill right after its generation
        while search.evolution.generation < c.generations:
            search.evolution.run(lambda *args: _fitness(search, *args), search.evolution.generation + 1,
                                 on_generation=lambda row: _log_generation(search, row, bar))
            _evaluate_mean(search, bar)
    search.save()
    search.plot()
    if search.seconds:
        print(f"{search.prefix} {search.steps} agent steps in {search.seconds:.1f} s "
              f"({search.steps / search.seconds:.0f} steps/s{' in the dream' if search.in_dream else ''})")


def _fitness(search: Search, solutions: np.ndarray, generation: int, rng: np.random.Generator):
    """Evolution's fitness_fn: the members on the generation's tracks, and the environment steps it took."""
    cfg, c = search.cfg, search.cfg.controller
    heldout = np.concatenate([search.eval_seeds, search.final_seeds])
    tracks = training_tracks(rng, c.rollouts_per_member, heldout)
    if search.in_dream:
        steps, concurrent, patience = cfg.dream.max_steps, None, None  # the dream costs no simulator time
    else:
        steps, concurrent, patience = c.max_steps, search.max_concurrent, c.patience or None

    def run(params, seeds):
        return rollout.run_episodes(search.train_world, params, seeds, steps, concurrent, patience=patience)

    start = time.perf_counter()
    fitness, env_steps = generation_fitness(run, solutions, tracks, c.racing, c.weight_decay)
    search.steps += env_steps
    search.seconds += time.perf_counter() - start
    return fitness, {"env_steps": env_steps}


def _evaluate_mean(search: Search, bar) -> None:
    """Score the CMA mean on the held-out tracks if due; keep it as the controller if it is the best so far."""
    import tensorflow as tf

    if not search.evaluation_due():
        return
    cfg, c, g = search.cfg, search.cfg.controller, search.evolution.generation
    mean, eval_seeds = search.evolution.mean, search.eval_seeds
    result = rollout.evaluate(search.world, mean, eval_seeds, c.max_steps, search.max_concurrent,
                              progress=f"generation {g}: held-out tracks")
    row = {"mean": result["mean"], "std": result["std"], "env_steps": result["steps"], "seconds": result["seconds"]}
    if search.in_dream:
        dreamed = rollout.evaluate(search.dream, mean, eval_seeds, cfg.dream.max_steps)
        row.update(dream_mean=dreamed["mean"], dream_std=dreamed["std"])
    score = row["dream_mean" if search.in_dream else "mean"]
    if search.best is None or score > search.best[1]:
        search.best = (g, score, mean)
    # The controller file first: if a kill lands between the two writes, the evaluation
    # is redone on resume (deterministically, with the same score).
    search.save()
    search.evals[g] = row
    write_evals(search.out / EVAL_NAME, search.evals, DREAM_EVAL_FIELDS if search.in_dream else EVAL_FIELDS)
    with search.writer.as_default(step=g):
        for key in ("mean", "std") + (("dream_mean", "dream_std") if search.in_dream else ()):
            tf.summary.scalar(f"heldout{'_dream' if key.startswith('dream') else ''}/{key.split('_')[-1]}", row[key])
    search.writer.flush()
    search.plot()
    dreamed = f" (dream: {row['dream_mean']:.1f} +- {row['dream_std']:.1f})" if search.in_dream else ""
    bar.write(f"{search.prefix} generation {g}: CMA mean scores {row['mean']:.1f} +- {row['std']:.1f} on "
              f"{len(eval_seeds)} held-out tracks{dreamed} (best so far: {search.best[1]:.1f} at "
              f"generation {search.best[0]})")


def _log_generation(search: Search, row: dict, bar) -> None:
    """Evolution's on_generation: TensorBoard, the controller file, the curve and the progress bar."""
    import tensorflow as tf

    g = row["generation"]
    steps_per_s = search.steps / max(search.seconds, 1e-9)
    with search.writer.as_default(step=g):
        for name in ("best", "mean", "std", "worst"):
            tf.summary.scalar(f"fitness/{name}", row[name])
        tf.summary.scalar("cma/sigma", row["sigma"])
        tf.summary.scalar("speed/agent_steps_per_s", steps_per_s)
        tf.summary.scalar("cost/env_steps", row["env_steps"])
    search.writer.flush()
    search.save()
    search.plot()
    bar.update(1)
    bar.set_postfix(best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}", std=f"{row['std']:.1f}",
                    steps_s=f"{steps_per_s:.0f}")


def _final_evaluation(search: Search, command: str) -> None:
    """Score the selected controller on the final held-out tracks (always full episodes) -> ``metrics.json``."""
    cfg, c, evolution = search.cfg, search.cfg.controller, search.evolution
    params = search.best[2] if search.best else evolution.mean
    # 100 real episodes take ~40 minutes on 2 cores: each finished wave (of 25) is kept, so a kill costs one wave.
    partial = rollout.checkpoint_for(search.out / METRICS_NAME)
    metrics = rollout.final_evaluation(search.world, params, cfg, max_concurrent=search.max_concurrent,
                                       progress="final evaluation", checkpoint=partial)
    metrics.update(
        generation=evolution.generation, controller=str(search.out / CONTROLLER_NAME), which="params",
        selected_at_generation=search.best[0] if search.best else evolution.generation,
        env=c.env, z_input=c.z_input, init_from=c.init_from, command=command, observation="stock",
        trained_on_observation=training_observation(cfg),
    )
    if search.in_dream:
        final_seeds = search.final_seeds
        dreamed = rollout.evaluate(search.dream, params, final_seeds, cfg.dream.max_steps)
        metrics["dream"] = {key: dreamed[key] for key in ("mean", "std", "min", "max", "scores", "lengths")}
        metrics["dream"].update(temperature=search.tau, max_steps=cfg.dream.max_steps, episodes=len(final_seeds))
    storage.atomic_write_json(search.out / METRICS_NAME, metrics)
    partial.unlink(missing_ok=True)
    dreamed = (f"; in the dream {metrics['dream']['mean']:.1f} +- {metrics['dream']['std']:.1f}"
               if search.in_dream else "")
    print(f"{search.prefix} final evaluation on {metrics['episodes']} held-out tracks: {metrics['mean']:.1f} +- "
          f"{metrics['std']:.1f} (min {metrics['min']:.1f}, max {metrics['max']:.1f}){dreamed} -> "
          f"{search.out / METRICS_NAME}")
