"""The iterative procedure of the seed report (``06_iterate.py``): collect with C, refit M, retrain C in the dream.

The seed report's "Complex environments" section: roll out the current controller in the real
environment, train M on everything seen so far, train C inside M, and go back to rolling out.
A dream learned from random-policy rollouts alone never sees the car drive well, so each
iteration adds data of the kind the newest controller meets. Per iteration ``i = 1, 2, ...``,
in ``<data>/iterations/iter_<iii>/``:

1. ``rollouts/``: ``iterate.episodes`` real episodes of the current controller (iteration 1: the
   ``params`` of ``<data>/controller/`` or of a ``<data>/controller_dream_t*/``, else the CMA
   starting point, zeros) with temporally correlated action noise of std ``iterate.action_noise``
   (and steering lapses with ``iterate.steer_lapses``, ``recording.NoisyWorld``),
   seen through V and the previous iteration's M exactly as in stage 5, recorded in stage 1's layout on
   ``env.observation`` frames, each file tagged with the policy "controller" (``worldmodels.recording``,
   the code of stage 1's ``controller`` policy). Episode files are numbered from ``i * EPISODE_BLOCK``, so that
   every name is unique over all folders (M's held-out split is decided by the name).
   With ``iterate.curiosity_variants`` > 0 the collecting controller is instead the fittest of C and
   that many variants of it by real return + ``iterate.curiosity`` x M's NLL of the transitions on one
   short real episode each (``worldmodels.curiosity``), chosen once and kept in ``curiosity.npz``.
   With ``iterate.repair_episodes`` > 0 the collection is followed by the repair of the dream
   (``worldmodels.repair``): C drives ``iterate.repair_horizon`` steps in the previous M's dream from
   ``iterate.repair_candidates`` real states of the new episodes, the same actions are replayed in the real
   environment from the same states, and the ``iterate.repair_episodes`` replays of largest disagreement
   between dream and reality are added to ``rollouts/``, tagged "repair" and numbered from
   ``i * EPISODE_BLOCK + REPAIR_FIRST`` (what was measured: ``repair.npz``).
2. ``series/``: the episodes encoded by V (``worldmodels.encode``, stage 3's code).
3. ``rnn/``: M fine-tuned from the previous iteration's M (iteration 1: ``<data>/rnn/``) for
   ``iterate.rnn_steps`` steps on the series of stage 3 and of every iteration so far
   (``rnn_training.train_rnn``, stage 4's code, with its held-out split and metrics).
4. ``controller/``: C evolved in the dream of the new M for ``iterate.generations`` generations,
   starting from the previous controller (``controller_training.train_controller``, stage 5's
   code, the dream starting from ``<data>/series``, or, branched (``dream.start_every``), from every series so
   far), then scored on ``iterate.eval_episodes``
   held-out real tracks (stock pixels, full episodes) and as many dream episodes.
5. ``diagnostics.png`` and a row of ``<data>/iterations/iterations.csv`` (:data:`FIELDS`), written last;
   its ``seconds`` are the iteration's wall time over every run of it (``seconds.json``, :data:`CLOCK_FILE`).

Resumable after SIGKILL anywhere: every step skips what is complete (the stages' own resume
logic: episode files are atomic, M and the search resume from their checkpoints, a finished run
is a no-op) and the row is appended last, so a rerun of the same command reaches the same rows.
A collection cut short drives again every wave of :data:`~worldmodels.recording.WAVE` episodes that has
a missing one (saving only the missing files), and an encoding cut short is redone whole, because V's
and M's float results depend on the batch size in the last bit: an episode is reproduced
exactly only in the batches it first ran in.
An iteration's folder is never written by a later one; a larger ``iterate.iterations`` continues.
A run carried to another machine (``python -m worldmodels.carry save --iterations``) travels without its
episodes: :func:`refill_data` records a finished iteration's episodes again where they are missing
(the only files it writes), because every later iteration fine-tunes M on them.

The row's M metrics are those of the M the collecting controller was trained in (the previous
iteration's, for iteration 1 ``<data>/rnn/``) on the episodes just collected, which it has never
trained on: how well the dream predicted what the controller then met in reality. So are the diagnostics
(``worldmodels.diagnostics``, :func:`worldmodels.diagnostics.diagnose`): the exploit gap of the same recorded actions from
the same state, and the latent error open loop and teacher-forced, drawn in the iteration's ``diagnostics.png``.
The row also holds the curiosity's choice (:data:`CURIOSITY_FIELDS`, NaN when it is off), the rank
correlation of the dream and real scores of the iterations so far (:data:`RANK_FIELD`) and the repair's
measurements (:data:`REPAIR_FIELDS`, NaN when it is off) and whether the previous M knows what steering does
(:data:`STEERING_FIELDS`, ``worldmodels.diagnostics.steering_response``). The "new episodes" of the M metrics, the
diagnostics and ``collect_steps`` are the collected ones (repair episodes are counted in ``repair_env_steps``).
Tables written before those columns existed keep their rows, read with NaN in the new columns.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import (artifacts, collect, controller_training, curiosity, diagnostics, encode, recording,
                         repair, rnn_training, sequences, stage, storage)
from worldmodels.env import episode_seed

ITERATIONS = artifacts.ITERATIONS
CSV_NAME = artifacts.ITERATIONS_TABLE
# Episode files of iteration i are numbered from i * EPISODE_BLOCK (stage 1 uses 0.. data.episodes - 1).
EPISODE_BLOCK = 1_000_000
# ... and its repair episodes from i * EPISODE_BLOCK + REPAIR_FIRST (so iterate.episodes must stay below it).
REPAIR_FIRST = EPISODE_BLOCK // 2
# Base seed of the collection tracks (beside rollout's EVAL_SEED_OFFSET and FINAL_EVAL_SEED_OFFSET), and of the
# tracks on which the curiosity variants are scored (one per iteration).
COLLECT_SEED_OFFSET = 3 * 10**6
CURIOSITY_SEED_OFFSET = 4 * 10**6
CURIOSITY_FILE = "curiosity.npz"
REPAIR_FILE = repair.REPAIR_FILE
# The iteration's wall time so far, over all the runs that resumed it (storage.Stopwatch).
CLOCK_FILE = "seconds.json"
# What defines an iterations folder: a rerun with other values of these would mix two procedures.
ITERATE_KEYS = artifacts.RNN_KEYS + (
    "iterate.episodes", "iterate.action_noise", "iterate.steer_lapses", "iterate.steer_lapse_steps",
    "iterate.rnn_steps", "iterate.generations",
    "iterate.eval_episodes", "iterate.seed", "data.max_steps", "controller.seed", "controller.z_input",
    "env.observation", "iterate.curiosity_variants", "iterate.curiosity", "iterate.curiosity_steps",
    "iterate.repair_episodes",
)
# ... and with curiosity on, the step of its variants (a folder without curiosity keeps accepting any).
CURIOSITY_KEYS = ("controller.sigma_init",)
# ... and with the repair on, how it chooses and dreams its windows.
REPAIR_KEYS = ("iterate.repair_candidates", "iterate.repair_horizon", "dream.temperature", "dream.skip_initial_frames")
# The diagnostics of the previous M on the episodes just collected (worldmodels.diagnostics, whose HORIZON, STEPS
# and FIELDS say what is measured), drawn into each iteration's folder.
DIAGNOSTICS_FIGURE = "diagnostics.png"
# The curiosity's choice (worldmodels.curiosity; NaN when it is off): the chosen candidate (0 = C itself), its real
# return and mean NLL per transition on its scoring episode, beta times that (the mean bonus per step), and the
# real steps all candidates drove (counted in real_env_steps).
CURIOSITY_FIELDS = ("curiosity_variant", "curiosity_return", "curiosity_nll", "curiosity_bonus", "curiosity_env_steps")
# Spearman's rho between the dream and real scores of the controllers of iterations 1..i (NaN below 3 of them):
# does a better dream score still mean a better real one, as the dream is refitted?
RANK_FIELD = "dream_real_rank_corr"
RANK_MIN_ITERATIONS = 3
# The repair (worldmodels.repair; NaN and 0 steps when it is off): the mean latent disagreement of the windows
# kept and of all candidates (sum over Z of (dream z - V's mu of the real frame)^2 per step), the mean reward gap
# of all candidates (M's predicted minus the real return of the window: the exploit under C's own steering), and
# the real steps of all replays (counted in real_env_steps).
REPAIR_FIELDS = ("repair_disagreement", "repair_disagreement_all", "repair_reward_gap", "repair_env_steps")
# Does the previous M know what steering does (worldmodels.diagnostics.steering_response)? Full left against full
# right for STEERING_HORIZON steps from frame dream.skip_initial_frames of up to STEERING_EPISODES of the episodes
# just collected: the squared distance of the two z after 10 steps in M and in reality, and the real steps of the
# replays (counted in real_env_steps).
STEERING_HORIZON, STEERING_EPISODES = 20, 16
STEERING_FIELDS = ("steering_model_10", "steering_real_10", "steering_env_steps")
# Columns that tables written by earlier versions lack (read as NaN).
LATER_FIELDS = diagnostics.FIELDS + CURIOSITY_FIELDS + (RANK_FIELD,) + REPAIR_FIELDS + STEERING_FIELDS
FIELDS = (
    "iteration", "collect_steps", "eval_steps", "real_env_steps", "episodes_by_policy", "m_z_nll_new",
    "m_reward_mse_tiles_new", "m_done_auc_new", "dream_score", "real_score", "real_std", "exploit_gap", "seconds",
) + LATER_FIELDS
log = stage.tagged("06")


def iteration_dir(data_dir, iteration: int) -> Path:
    """``<data>/iterations/iter_<iii>``, laid out like a data dir (``rollouts/``, ``series/``, ``rnn/``)."""
    return Path(data_dir) / ITERATIONS / f"iter_{int(iteration):03d}"


def models_dir(data_dir, iteration: int) -> Path:
    """Where M of ``iteration`` lives as ``rnn/rnn.keras``: the iteration's folder, or ``data_dir`` for 0."""
    return Path(data_dir) if iteration == 0 else iteration_dir(data_dir, iteration)


# --------------------------------------------------------------------------- collecting


def collect_episodes(cfg: config.Config, iteration: int, data_dir, params: np.ndarray, vae, rnn) -> int:
    """Record the missing episodes of ``iteration`` with controller ``params`` (N,) plus noise; returns how many."""
    folder = iteration_dir(data_dir, iteration) / artifacts.ROLLOUTS
    first = iteration * EPISODE_BLOCK
    pending, notes = collect.pending_indices(folder, cfg.iterate.episodes, first)
    for note in notes:
        log(note)
    config.save_config(cfg, folder)
    if not pending:
        return 0
    indices = range(first, first + cfg.iterate.episodes)
    seeds = [episode_seed(COLLECT_SEED_OFFSET + cfg.iterate.seed, index) for index in indices]
    it = cfg.iterate
    lapses = (f" and steering lapses (chance {it.steer_lapses:g} a step, {it.steer_lapse_steps:g} steps on average)"
              if it.steer_lapses else "")
    log(f"iteration {iteration}: collecting {len(pending)} of {len(indices)} episode(s) with the controller plus "
        f"noise of std {it.action_noise}{lapses} ({cfg.env.observation} observation) -> {folder}")
    collecting = dataclasses.replace(driving(cfg, cfg.data.max_steps), steer_lapses=it.steer_lapses,
                                     steer_lapse_steps=it.steer_lapse_steps)
    return recording.drive_and_record(folder, indices, seeds, pending, params, vae, rnn, collecting,
                                      progress=f"iteration {iteration}: collecting")


def driving(cfg: config.Config, max_steps: int) -> recording.Driving:
    """How every iteration drives in the real environment: ``iterate.action_noise``, the controller's z input
    and parallelism, ``env.observation``."""
    return recording.Driving.of_config(cfg, max_steps, cfg.iterate.action_noise)


def collecting_controller(cfg: config.Config, iteration: int, data_dir, params: np.ndarray, vae, rnn) -> np.ndarray:
    """The controller (N,) that collects in ``iteration``: C's ``params`` itself, or with ``iterate.curiosity_variants``
    > 0 the fittest of C and its variants (``worldmodels.curiosity.select``), chosen once and kept in the
    iteration's :data:`CURIOSITY_FILE` (a resumed iteration collects with the same one)."""
    if cfg.iterate.curiosity_variants == 0:
        return params
    path = iteration_dir(data_dir, iteration) / CURIOSITY_FILE
    if not path.is_file():
        it = cfg.iterate
        log(f"iteration {iteration}: scoring the controller and {it.curiosity_variants} variant(s) by return + "
            f"{it.curiosity} x M's NLL on one real episode each")
        chosen = curiosity.select(params, vae, rnn, driving(cfg, min(it.curiosity_steps, cfg.data.max_steps)),
                                  it.curiosity_variants, cfg.controller.sigma_init, it.curiosity,
                                  episode_seed(CURIOSITY_SEED_OFFSET + it.seed, iteration),
                                  [it.seed, iteration, curiosity.VARIANT_KEY])
        storage.save_npz(path, chosen)
    with np.load(path) as saved:
        chosen = int(saved["chosen"])
        log(f"iteration {iteration}: collecting with candidate {chosen} (0 = the controller itself) of {path}")
        return saved["candidates"][chosen]


def curiosity_row(cfg: config.Config, iteration: int, data_dir) -> dict:
    """The :data:`CURIOSITY_FIELDS` of ``iteration`` from its :data:`CURIOSITY_FILE` (NaN and 0 steps without one)."""
    path = iteration_dir(data_dir, iteration) / CURIOSITY_FILE
    if not path.is_file():
        return {**{key: math.nan for key in CURIOSITY_FIELDS}, "curiosity_env_steps": 0}
    with np.load(path) as saved:
        k = int(saved["chosen"])
        nll = float(saved["nll"][k] / max(int(saved["transitions"][k]), 1))
        return {"curiosity_variant": k, "curiosity_return": float(saved["returns"][k]), "curiosity_nll": nll,
                "curiosity_bonus": cfg.iterate.curiosity * nll, "curiosity_env_steps": int(saved["lengths"].sum())}


def repair_dream(cfg: config.Config, iteration: int, data_dir, params: np.ndarray, vae, rnn) -> dict | None:
    """With ``iterate.repair_episodes`` > 0, add the iteration's repair episodes (``worldmodels.repair``) to its
    ``rollouts/``: C ``params`` (N,) in the dream of ``rnn`` (the M it was trained in) from real states of the
    collected episodes, replayed in reality. Returns the summary (None when off), kept in :data:`REPAIR_FILE`."""
    it = cfg.iterate
    if it.repair_episodes == 0:
        return None
    folder = iteration_dir(data_dir, iteration)
    summary = folder / repair.REPAIR_FILE
    if not summary.is_file():
        log(f"iteration {iteration}: dreaming {it.repair_horizon} steps of the controller from {it.repair_candidates} "
            f"real states and replaying them in reality; keeping the {it.repair_episodes} most disagreeing")
    plan = repair.Plan(it.repair_candidates, it.repair_episodes, it.repair_horizon, cfg.dream.temperature,
                       cfg.dream.skip_initial_frames, cfg.data.max_steps, (it.seed, iteration), cfg.rnn.encode_batch_size)
    return repair.repair(folder / artifacts.ROLLOUTS, summary, collected_paths(folder / artifacts.ROLLOUTS, iteration),
                         iteration * EPISODE_BLOCK + REPAIR_FIRST, params, vae, rnn, plan,
                         driving(cfg, cfg.data.max_steps))


def collected_paths(folder, iteration: int) -> list[Path]:
    """The episode files (rollouts or series) in ``folder`` that iteration ``iteration`` collected (not repaired)."""
    return [path for path in storage.list_episodes(folder, "episodes")
            if storage.episode_index(path) < iteration * EPISODE_BLOCK + REPAIR_FIRST]


def repair_row(iteration: int, data_dir) -> dict:
    """The :data:`REPAIR_FIELDS` of ``iteration`` from its :data:`REPAIR_FILE` (NaN and 0 steps without one)."""
    path = iteration_dir(data_dir, iteration) / REPAIR_FILE
    if not path.is_file():
        return {**{key: math.nan for key in REPAIR_FIELDS}, "repair_env_steps": 0}
    with np.load(path) as saved:
        latent = saved["latent"]
        return {"repair_disagreement": float(np.nanmean(latent[saved["chosen"]])),
                "repair_disagreement_all": float(np.nanmean(latent)),
                "repair_reward_gap": float(np.mean(saved["reward_gap"])), "repair_env_steps": int(saved["env_steps"])}


# --------------------------------------------------------------------------- the other steps


def encode_episodes(cfg: config.Config, iteration: int, data_dir, vae) -> int:
    """Encode the iteration's rollouts (stage 3's code) unless every one has its series; returns how many were missing.

    All of them are encoded again when one is missing, so that V sees the same batches as in an
    uninterrupted run (its float results depend on the batch in the last bit) and a resumed
    iteration writes the same series.
    """
    folder = iteration_dir(data_dir, iteration)
    paths = storage.list_episodes(folder / artifacts.ROLLOUTS, artifacts.ROLLOUTS)
    series_dir = artifacts.series_dir(folder)
    stage.check_saved_config(series_dir, cfg, artifacts.SERIES_KEYS)
    series_dir.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, series_dir)
    pending = encode.pending_episodes(paths, series_dir)
    if pending:
        for _ in encode.encode_rollouts(vae, paths, series_dir, cfg.rnn.encode_batch_size):
            pass
    return len(pending)


def series_dirs(data_dir, iteration: int) -> list[Path]:
    """The series folders of stage 3 and of iterations 1..``iteration``: every episode so far."""
    return [artifacts.series_dir(data_dir)] + [artifacts.series_dir(iteration_dir(data_dir, j))
                                               for j in range(1, iteration + 1)]


def fine_tune_rnn(cfg: config.Config, iteration: int, data_dir) -> dict:
    """M of ``iteration``: the previous M trained ``iterate.rnn_steps`` more steps on every series so far."""
    rnn_cfg = config.apply_overrides(cfg, {"rnn.steps": cfg.iterate.rnn_steps})
    return rnn_training.train_rnn(rnn_cfg, data_dir, series_dirs=series_dirs(data_dir, iteration),
                                  out=artifacts.rnn_dir(iteration_dir(data_dir, iteration)),
                                  init_path=artifacts.rnn_path(models_dir(data_dir, iteration - 1)))


def controller_config(cfg: config.Config) -> config.Config:
    """The search of every iteration: in the dream, ``iterate.generations`` generations, scored on
    ``iterate.eval_episodes`` held-out real tracks (the same tracks in every iteration).

    The CMA mean is evaluated once, after the last generation: a dream search's periodic evaluations
    select by the dream score and only watch the real one, yet each costs ``controller.eval_episodes``
    real episodes (on `small`, 40 evaluations of 16 episodes would cost ten times the collection).
    """
    return config.apply_overrides(cfg, {"controller.env": "dream", "controller.init_from": "",
                                        "controller.generations": cfg.iterate.generations,
                                        "controller.eval_every": cfg.iterate.generations,
                                        "controller.final_eval_episodes": cfg.iterate.eval_episodes})


def initial_controller(cfg: config.Config, data_dir) -> tuple[np.ndarray, str]:
    """Iteration 1's controller ``(params (N,), where from)``: stage 5's real-trained one, else a dream-trained
    one (``dream.temperature``'s first), else zeros (the CMA starting point)."""
    folder = artifacts.iterations_start_dir(data_dir, cfg.dream.temperature, record=True)
    if folder is not None:
        path = folder / artifacts.CONTROLLER_FILE
        params, _ = artifacts.load_controller(path, "params", cfg.vae.z_size, cfg.rnn.hidden_units)
        return params, str(path)
    return np.zeros(num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units)), "zeros (no controller in the data dir)"


def current_controller(cfg: config.Config, data_dir, iteration: int) -> tuple[np.ndarray, str]:
    """The controller that collects in ``iteration`` and starts its search: the previous iteration's."""
    if iteration == 1:
        return initial_controller(cfg, data_dir)
    path = iteration_dir(data_dir, iteration - 1) / artifacts.CONTROLLER / artifacts.CONTROLLER_FILE
    params, _ = artifacts.load_controller(path, "params", cfg.vae.z_size, cfg.rnn.hidden_units)
    return params, str(path)


# --------------------------------------------------------------------------- the row


def read_rows(path) -> list[dict]:
    """The rows of ``iterations.csv`` as written (strings), [] if it does not exist; damaged: CorruptFileError.

    A table written before the diagnostics' or the curiosity's columns existed reads with "nan" in them (its rows
    are kept as they are, since their iterations' M and episodes may be gone).
    """
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set(FIELDS)
    if not set(FIELDS) - set(LATER_FIELDS) <= columns <= set(FIELDS) or \
            any(not row["iteration"].isdigit() for row in rows):
        raise storage.CorruptFileError(f"{path} is not an iterations table with columns {', '.join(FIELDS)}; "
                                       "delete it to rewrite it from the iterations' folders")
    return [{key: row.get(key, "nan") for key in FIELDS} for row in rows]


def append_row(path, row: dict) -> None:
    """Rewrite ``iterations.csv`` atomically with ``row`` added (numbers as ``repr``, so they read back exactly)."""
    rows = read_rows(path) + [{key: _cell(row[key]) for key in FIELDS}]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.atomic_write_text(path, buffer.getvalue())


def _cell(value) -> str:
    if value is None:
        return "nan"
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)


def policy_counts(data_dir, iteration: int) -> str:
    """Episodes M has been trained on by policy, e.g. ``brownian:200;controller:128``: the ``policy`` tag of
    every series file of stage 3 and of iterations 1..``iteration`` (``untagged`` for files made before tags)."""
    counts = collections.Counter()
    for folder in series_dirs(data_dir, iteration):
        for path in storage.list_episodes(folder, artifacts.SERIES):
            tag = storage.load_episode(path, "series", keys=("policy",)).get("policy")
            counts["untagged" if tag is None else str(tag)] += 1
    return ";".join(f"{name}:{count}" for name, count in sorted(counts.items()))


def rnn_on_new_episodes(cfg: config.Config, iteration: int, data_dir) -> dict:
    """The previous M (the one the collecting controller was trained in) on the episodes just collected:
    z NLL with z drawn from V's posterior, reward MSE on tile steps, done AUC (``sequences.evaluate_model``),
    plus the diagnostics' columns (:func:`worldmodels.diagnostics.diagnose`)."""
    rnn = artifacts.load_rnn(models_dir(data_dir, iteration - 1), cfg)
    paths = collected_paths(artifacts.series_dir(iteration_dir(data_dir, iteration)), iteration)
    m = sequences.evaluate_model(rnn, paths, cfg.rnn.sequence_length, cfg.rnn.batch_size, sample_seed=cfg.rnn.seed)
    return {**m, **diagnostics.diagnose(cfg, rnn, paths, iteration_dir(data_dir, iteration) / DIAGNOSTICS_FIGURE),
            **steering_row(cfg, iteration, data_dir, rnn)}


def steering_row(cfg: config.Config, iteration: int, data_dir, rnn) -> dict:
    """The :data:`STEERING_FIELDS` of ``rnn`` (the previous M) on the first collected rollouts of ``iteration``."""
    paths = collected_paths(iteration_dir(data_dir, iteration) / artifacts.ROLLOUTS, iteration)[:STEERING_EPISODES]
    rollouts = diagnostics.load_for_steering(paths, cfg.dream.skip_initial_frames, STEERING_HORIZON)
    found = diagnostics.steering_response(artifacts.load_vision(data_dir, cfg), rnn, rollouts,
                                          cfg.dream.skip_initial_frames, STEERING_HORIZON, diagnostics.replay_driving(cfg),
                                          cfg.rnn.encode_batch_size)
    k = min(10, len(found["steps"]))
    return {"steering_model_10": float(found["model"][k - 1]), "steering_real_10": float(found["real"][k - 1]),
            "steering_env_steps": found["env_steps"]}


def score_rank_correlation(rows: list[dict], dream: float, real: float) -> float:
    """:data:`RANK_FIELD` over the scores of ``rows`` (as read, strings) and of the new row: ``diagnostics.rank_correlation``
    of the dream and real scores of every iteration so far, NaN with fewer than :data:`RANK_MIN_ITERATIONS`."""
    dreams = [float(row["dream_score"]) for row in rows] + [float(dream)]
    reals = [float(row["real_score"]) for row in rows] + [float(real)]
    if len(dreams) < RANK_MIN_ITERATIONS:
        return math.nan
    return diagnostics.rank_correlation(dreams, reals)


def make_row(cfg: config.Config, iteration: int, data_dir, rows: list[dict], seconds: float) -> dict:
    """The row of ``iteration`` from its folder: real environment steps (collection, the search's held-out
    evaluations and the final score, the curiosity's scoring episodes; cumulative from stage 1's episodes on),
    M on the new episodes, scores, the curiosity's choice; ``rows`` are those of the iterations before."""
    previous = rows[-1] if rows else None
    folder = iteration_dir(data_dir, iteration)
    out = folder / artifacts.CONTROLLER
    metrics = storage.read_json(out / artifacts.METRICS_FILE)
    evals = controller_training.read_evals(out / controller_training.EVAL_NAME)
    eval_steps = int(sum(row.get("env_steps", 0) for row in evals.values())) + int(metrics["steps"])
    series = artifacts.series_dir(folder)
    collect_steps = sequences.series_steps(series, collected_paths(series, iteration))
    before = sequences.series_steps(artifacts.series_dir(data_dir)) if previous is None \
        else int(previous["real_env_steps"])
    m = rnn_on_new_episodes(cfg, iteration, data_dir)
    curious, repaired = curiosity_row(cfg, iteration, data_dir), repair_row(iteration, data_dir)
    dream, real = metrics["dream"]["mean"], metrics["mean"]
    return {
        "iteration": iteration, "collect_steps": collect_steps, "eval_steps": eval_steps,
        "real_env_steps": before + collect_steps + eval_steps + curious["curiosity_env_steps"]
        + repaired["repair_env_steps"] + m["steering_env_steps"],
        "episodes_by_policy": policy_counts(data_dir, iteration),
        "m_z_nll_new": m["z_nll"], "m_reward_mse_tiles_new": m.get("reward_mse_tiles"),
        "m_done_auc_new": m.get("done_auc"), "dream_score": dream, "real_score": real, "real_std": metrics["std"],
        "exploit_gap": dream - real, "seconds": seconds, **{key: m[key] for key in diagnostics.FIELDS}, **curious,
        RANK_FIELD: score_rank_correlation(rows, dream, real), **repaired,
        **{key: m[key] for key in STEERING_FIELDS},
    }


# --------------------------------------------------------------------------- the procedure


def run_iteration(cfg: config.Config, iteration: int, data_dir, vae, command: str = "") -> float:
    """Steps 1-4 of ``iteration`` (each skipped when complete); returns the iteration's wall time in seconds,
    summed over every run of it (a resumed iteration counts its earlier runs, :data:`CLOCK_FILE`)."""
    with storage.Stopwatch(iteration_dir(data_dir, iteration) / CLOCK_FILE) as watch:
        _run_steps(cfg, iteration, data_dir, vae, command)
    return watch.seconds


def record_episodes(cfg: config.Config, iteration: int, data_dir, vae, params: np.ndarray) -> int:
    """Steps 1-2 of ``iteration`` with its controller ``params`` (N,): collect (curiosity's collector if on),
    repair, encode; each writes only what is missing. Returns how many episodes were encoded."""
    previous_rnn = artifacts.load_rnn(models_dir(data_dir, iteration - 1), cfg)
    collector = collecting_controller(cfg, iteration, data_dir, params, vae, previous_rnn)
    collect_episodes(cfg, iteration, data_dir, collector, vae, previous_rnn)
    repair_dream(cfg, iteration, data_dir, params, vae, previous_rnn)
    return encode_episodes(cfg, iteration, data_dir, vae)


def _run_steps(cfg: config.Config, iteration: int, data_dir, vae, command: str) -> None:
    params, source = current_controller(cfg, data_dir, iteration)
    log(f"iteration {iteration}: controller {source}")
    encoded = record_episodes(cfg, iteration, data_dir, vae, params)
    log(f"iteration {iteration}: encoded {encoded} episode(s); fine-tuning M")
    fine_tune_rnn(cfg, iteration, data_dir)
    rnn = artifacts.load_rnn(iteration_dir(data_dir, iteration), cfg)
    # A branched dream (dream.start_every > 0) starts from every episode so far, whose states are the ones C meets;
    # one start per series keeps stage 3's (the start line of other tracks adds nothing there).
    starts_from = series_dirs(data_dir, iteration) if cfg.dream.start_every else None
    controller_training.train_controller(controller_config(cfg), data_dir, models=(vae, rnn), command=command,
                                         prefix=f"[06 iteration {iteration}]", series_dirs=starts_from,
                                         out=iteration_dir(data_dir, iteration) / artifacts.CONTROLLER, x0=params)


def check_iterations_folder(cfg: config.Config, data_dir) -> Path:
    """``<data>/iterations`` with ``config.json``; one made with other :data:`ITERATE_KEYS` is refused."""
    artifacts.require_models(data_dir, cfg)
    storage.list_episodes(artifacts.series_dir(data_dir), "latent series",
                          f"M is fine-tuned on them and the dream starts from them; make them with: "
                          f"python {artifacts.MAKERS[artifacts.SERIES]}")
    root = Path(data_dir) / ITERATIONS
    if cfg.iterate.episodes > REPAIR_FIRST:
        raise config.ConfigError(f"iterate.episodes must be at most {REPAIR_FIRST} (the file numbers above are the "
                                 f"repair's), got {cfg.iterate.episodes}")
    stage.check_saved_config(root, cfg, ITERATE_KEYS + (CURIOSITY_KEYS if cfg.iterate.curiosity_variants else ())
                             + (REPAIR_KEYS if cfg.iterate.repair_episodes else ()))
    root.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, root)
    return root


def expected_episodes(cfg: config.Config, iteration: int, data_dir) -> list[int]:
    """Indices of the episodes ``iteration`` adds to M's data: its collected ones, then the repair's that its
    :data:`REPAIR_FILE` chose (none without one)."""
    first = iteration * EPISODE_BLOCK
    indices = list(range(first, first + cfg.iterate.episodes))
    path = iteration_dir(data_dir, iteration) / REPAIR_FILE
    if path.is_file():
        with np.load(path) as saved:
            indices += [first + REPAIR_FIRST + k for k in range(len(saved["chosen"]))]
    return indices


def data_complete(cfg: config.Config, iteration: int, data_dir) -> bool:
    """Whether every series of :func:`expected_episodes` is on disk (its rollouts may have been deleted)."""
    series = artifacts.series_dir(iteration_dir(data_dir, iteration))
    have = {storage.episode_index(path) for path in series.glob("episode_*.npz")} if series.is_dir() else set()
    return set(expected_episodes(cfg, iteration, data_dir)) <= have


def refill_data(cfg: config.Config, iteration: int, data_dir, vae) -> bool:
    """Record and encode again the episodes of a finished ``iteration`` whose series are missing, as it first did
    (same tracks, the same collecting controller, the repair's saved choice); returns whether it had to.

    A carried run (``python -m worldmodels.carry save --iterations``) travels without its episodes, but every later
    iteration fine-tunes M on them. Only the missing files of ``rollouts/`` and ``series/`` are written: M, the
    search and the row of the iteration are left as they are. On the machine that made them the episodes come out
    the same; on another CPU V's and M's floats, and so the controller's actions, may differ in the last bits.
    """
    if data_complete(cfg, iteration, data_dir):
        return False
    log(f"iteration {iteration}: its episodes are missing (a carried run?); recording them again for M's data")
    record_episodes(cfg, iteration, data_dir, vae, current_controller(cfg, data_dir, iteration)[0])
    return True


def run_iterations(cfg: config.Config, data_dir, command: str = "") -> list[dict]:
    """Run (or resume) iterations 1..``iterate.iterations``; returns the rows of ``iterations.csv``.

    The finished iterations' episodes are recorded again first where they are missing (:func:`refill_data`).
    """
    root = check_iterations_folder(cfg, data_dir)
    rows = read_rows(root / CSV_NAME)
    if len(rows) >= cfg.iterate.iterations:
        log(f"all {len(rows)} iterations are complete in {root / CSV_NAME}; nothing to do")
        return rows
    vae = artifacts.load_vision(data_dir, cfg)
    for iteration in range(1, len(rows) + 1):
        refill_data(cfg, iteration, data_dir, vae)
    for iteration in range(len(rows) + 1, cfg.iterate.iterations + 1):
        seconds = run_iteration(cfg, iteration, data_dir, vae, command)
        row = make_row(cfg, iteration, data_dir, rows, seconds)
        append_row(root / CSV_NAME, row)
        rows = read_rows(root / CSV_NAME)
        log(f"iteration {iteration}: real score {row['real_score']:.1f} +- {row['real_std']:.1f}, dream score "
            f"{row['dream_score']:.1f} (exploit gap {row['exploit_gap']:.1f}), {row['real_env_steps']} real "
            f"environment steps so far -> {root / CSV_NAME}")
    return rows
