"""The iterative procedure of the seed report (``06_iterate.py``): collect with C, refit M, retrain C in the dream.

The seed report's "Complex environments" section: roll out the current controller in the real
environment, train M on everything seen so far, train C inside M, and go back to rolling out.
A dream learned from random-policy rollouts alone never sees the car drive well, so each
iteration adds data of the kind the newest controller meets. Per iteration ``i = 1, 2, ...``,
in ``<data>/iterations/iter_<iii>/``:

1. ``rollouts/``: ``iterate.episodes`` real episodes of the current controller (iteration 1: the
   ``params`` of ``<data>/controller/`` or of a ``<data>/controller_dream_t*/``, else the CMA
   starting point, zeros) with temporally correlated action noise of std ``iterate.action_noise``
   (:class:`NoisyWorld`), seen through V and the previous iteration's M exactly as in stage 5
   (:class:`~worldmodels.rollout.RealWorld`), recorded in stage 1's layout (:class:`RecordingPool`,
   ``storage.save_episode``) on ``env.observation`` frames, each file tagged with the policy
   "controller" (stage 1's ``policy`` array, which encoding passes on). Episode files are numbered from ``i * EPISODE_BLOCK``, so that
   every name is unique over all folders (M's held-out split is decided by the name).
2. ``series/``: the episodes encoded by V (``worldmodels.encode``, stage 3's code).
3. ``rnn/``: M fine-tuned from the previous iteration's M (iteration 1: ``<data>/rnn/``) for
   ``iterate.rnn_steps`` steps on the series of stage 3 and of every iteration so far
   (``rnn_training.train_rnn``, stage 4's code, with its held-out split and metrics).
4. ``controller/``: C evolved in the dream of the new M for ``iterate.generations`` generations,
   starting from the previous controller (``controller_training.train_controller``, stage 5's
   code, the dream starting from ``<data>/series``), then scored on ``iterate.eval_episodes``
   held-out real tracks (stock pixels, full episodes) and as many dream episodes.
5. ``diagnostics.png`` and a row of ``<data>/iterations/iterations.csv`` (:data:`FIELDS`), written last.

Resumable after SIGKILL anywhere: every step skips what is complete (the stages' own resume
logic: episode files are atomic, M and the search resume from their checkpoints, a finished run
is a no-op) and the row is appended last, so a rerun of the same command reaches the same rows.
A collection or encoding cut short is redone whole (saving only the missing files), because V's
and M's float results depend on the batch size in the last bit: an episode is reproduced
exactly only in the batches it first ran in.
An iteration's folder is never written by a later one; a larger ``iterate.iterations`` continues.

The row's M metrics are those of the M the collecting controller was trained in (the previous
iteration's, for iteration 1 ``<data>/rnn/``) on the episodes just collected, which it has never
trained on: how well the dream predicted what the controller then met in reality. So are the diagnostics
(``worldmodels.diagnostics``, :func:`diagnose_new_episodes`): the exploit gap of the same recorded actions from
the same state, and the latent error open loop and teacher-forced, drawn in the iteration's ``diagnostics.png``.
Tables written before those columns existed keep their rows, read with NaN in the new columns.
"""

from __future__ import annotations

import collections
import csv
import io
import math
import time
from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import (artifacts, collect, controller_evaluation, controller_training, diagnostics, encode, envpool,
                         figures, rnn_training, rollout, sequences, stage, storage)
from worldmodels.env import ACTION_HIGH, ACTION_LOW, BrownianPolicy, episode_seed

ITERATIONS = "iterations"
CSV_NAME = "iterations.csv"
CONTROLLER_POLICY = "controller"
# Episode files of iteration i are numbered from i * EPISODE_BLOCK (stage 1 uses 0.. data.episodes - 1).
EPISODE_BLOCK = 1_000_000
# Base seed of the collection tracks (beside rollout's EVAL_SEED_OFFSET and FINAL_EVAL_SEED_OFFSET).
COLLECT_SEED_OFFSET = 3 * 10**6
# Episodes collected at once: each holds its frames in memory until it ends (12 KB a frame, 1000 frames
# an episode), so 32 at once need ~400 MB; the waves are the same in every run, so resuming stays exact.
COLLECT_CONCURRENT = 32
# Mixed into an episode's track seed to seed its action noise, a stream apart from the z noise.
ACTION_NOISE_KEY = 0xAC7109
# What defines an iterations folder: a rerun with other values of these would mix two procedures.
ITERATE_KEYS = artifacts.RNN_KEYS + (
    "iterate.episodes", "iterate.action_noise", "iterate.rnn_steps", "iterate.generations",
    "iterate.eval_episodes", "iterate.seed", "data.max_steps", "controller.seed", "controller.z_input",
    "env.observation",
)
# The diagnostics of the previous M on the episodes just collected (worldmodels.diagnostics): open-loop horizon
# in steps after dream.skip_initial_frames (a tenth of an episode: long enough for the open loop to drift, short
# enough that the drift is still informative), and the steps ahead at which the latent error is tabulated.
DIAGNOSTIC_HORIZON = 100
DIAGNOSTIC_STEPS = (1, 10, 50)
DIAGNOSTIC_FIELDS = ("exploit_gap_same_actions",) + tuple(
    f"latent_error_{mode}_{k}" for mode in ("open", "teacher") for k in DIAGNOSTIC_STEPS)
DIAGNOSTICS_FIGURE = "diagnostics.png"
FIELDS = (
    "iteration", "collect_steps", "eval_steps", "real_env_steps", "episodes_by_policy", "m_z_nll_new",
    "m_reward_mse_tiles_new", "m_done_auc_new", "dream_score", "real_score", "real_std", "exploit_gap", "seconds",
) + DIAGNOSTIC_FIELDS
log = stage.tagged("06")


def iteration_dir(data_dir, iteration: int) -> Path:
    """``<data>/iterations/iter_<iii>``, laid out like a data dir (``rollouts/``, ``series/``, ``rnn/``)."""
    return Path(data_dir) / ITERATIONS / f"iter_{int(iteration):03d}"


def models_dir(data_dir, iteration: int) -> Path:
    """Where M of ``iteration`` lives as ``rnn/rnn.keras``: the iteration's folder, or ``data_dir`` for 0."""
    return Path(data_dir) if iteration == 0 else iteration_dir(data_dir, iteration)


# --------------------------------------------------------------------------- collecting


class NoisyWorld:
    """A world (``worldmodels.rollout``) whose agents' actions get temporally correlated noise.

    Per agent, n_{t+1} = (1 - theta) n_t + s sqrt(1 - (1 - theta)^2) eps_t, eps_t ~ N(0, I_3), an
    Ornstein-Uhlenbeck process with stationary std ``scale`` and the correlation time of
    :class:`~worldmodels.env.BrownianPolicy` (theta = 0.1, ~10 steps). ``step`` applies
    clip(a_t + n_t) (B, 3) to CarRacing's action box, so M reads the actions actually taken. The
    noise of an episode comes from a generator seeded by its track seed, drawn once per step:
    an episode is reproducible from its seed alone, whatever wave it runs in.
    """

    def __init__(self, world, scale: float):
        if not scale >= 0:
            raise ValueError(f"action noise must be >= 0, got {scale!r}")
        self.world, self.scale = world, float(scale)
        self.capacity, self.z_size, self.hidden_size = world.capacity, world.z_size, world.hidden_size
        self._rngs: list[np.random.Generator] = []
        self._noise = np.zeros((0, 3))

    def reset(self, seeds):
        self._rngs = [np.random.default_rng([int(seed), ACTION_NOISE_KEY]) for seed in np.asarray(seeds)]
        self._noise = np.zeros((len(self._rngs), 3))
        return self.world.reset(seeds)

    def step(self, env_actions, active):
        keep = 1.0 - BrownianPolicy.theta
        eps = np.stack([rng.standard_normal(3) for rng in self._rngs])
        self._noise = keep * self._noise + self.scale * math.sqrt(1.0 - keep * keep) * eps
        noisy = np.clip(np.asarray(env_actions) + self._noise, ACTION_LOW, ACTION_HIGH).astype(np.float32)
        return self.world.step(noisy, active)


class RecordingPool:
    """A :class:`~worldmodels.envpool.CarRacingPool` that records its episodes in stage 1's rollout layout.

    ``obs[t]`` (64, 64, 3) uint8 is the frame before ``action[t]`` (3,), as ``collect.record_episode``
    records it; when an episode ends, ``save(arrays)`` gets its arrays (``storage.ROLLOUT_SCHEMA``).
    """

    def __init__(self, pool, save):
        self.pool, self.save = pool, save
        self.num_envs = pool.num_envs
        self._episodes: list[dict] = []
        self._step: tuple | None = None

    def reset(self, seeds):
        frames = self.pool.reset(seeds)
        self._episodes = [{"obs": [frame], "action": [], "reward": [], "terminated": [], "truncated": [],
                           "seed": int(seed)} for frame, seed in zip(frames, np.asarray(seeds))]
        return frames

    def step_async(self, actions, active=None):
        active = np.ones(len(self._episodes), bool) if active is None else np.asarray(active, bool)
        self._step = (np.asarray(actions, np.float32).copy(), active.copy())
        self.pool.step_async(actions, active)

    def step_wait(self):
        frames, reward, terminated, truncated = self.pool.step_wait()
        actions, active = self._step
        for i in np.flatnonzero(active):
            episode = self._episodes[i]
            for key, value in (("action", actions[i]), ("reward", reward[i]), ("terminated", terminated[i]),
                               ("truncated", truncated[i])):
                episode[key].append(value)
            if terminated[i] or truncated[i]:
                self.save(_rollout_arrays(episode))
            else:
                episode["obs"].append(frames[i])
        return frames, reward, terminated, truncated

    def close(self) -> None:
        self.pool.close()


def _rollout_arrays(episode: dict) -> dict[str, np.ndarray]:
    """The lists of :class:`RecordingPool` as the arrays of a rollout file (T frames, T steps)."""
    return {"obs": np.stack(episode["obs"]), "action": np.asarray(episode["action"], np.float32),
            "reward": np.asarray(episode["reward"], np.float32),
            "terminated": np.asarray(episode["terminated"], bool), "truncated": np.asarray(episode["truncated"], bool),
            "seed": np.int64(episode["seed"]), "policy": np.str_(CONTROLLER_POLICY)}


def collect_episodes(cfg: config.Config, iteration: int, data_dir, params: np.ndarray, vae, rnn) -> int:
    """Record the missing episodes of ``iteration`` with controller ``params`` (N,) plus noise; returns how many."""
    folder = iteration_dir(data_dir, iteration) / artifacts.ROLLOUTS
    first = iteration * EPISODE_BLOCK
    pending, notes = collect.pending_indices(folder, cfg.iterate.episodes, first)
    pending = set(pending)
    for note in notes:
        log(note)
    config.save_config(cfg, folder)
    if not pending:
        return 0
    # Every episode of the iteration is driven again, the complete ones unsaved: V's and M's float results
    # depend on the batch size in the last bit, so an episode is reproducible only in the same waves.
    index_of = {episode_seed(COLLECT_SEED_OFFSET + cfg.iterate.seed, first + j): first + j
                for j in range(cfg.iterate.episodes)}
    if len(index_of) != cfg.iterate.episodes:
        raise ValueError("two collection episodes drew the same track seed; change iterate.seed")

    def save(arrays):
        index = index_of[int(arrays["seed"])]
        if index in pending:
            storage.save_episode(folder / storage.episode_name(index), arrays, "rollout", cfg.data.compresslevel)

    c = cfg.controller
    log(f"iteration {iteration}: collecting {len(pending)} of {len(index_of)} episode(s) with the controller plus "
        f"noise of std {cfg.iterate.action_noise} ({cfg.env.observation} observation) -> {folder}")
    with envpool.CarRacingPool(min(len(index_of), COLLECT_CONCURRENT), cfg.data.max_steps,
                               c.backend, c.workers, c.ray_address, observation=cfg.env.observation) as pool:
        world = NoisyWorld(rollout.RealWorld(RecordingPool(pool, save), vae, rnn, c.z_input), cfg.iterate.action_noise)
        rollout.run_episodes(world, np.asarray(params)[None], np.array(list(index_of), np.int64)[None],
                             cfg.data.max_steps, progress=f"iteration {iteration}: collecting")
    return len(pending)


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


def fine_tune_rnn(cfg: config.Config, iteration: int, data_dir) -> dict:
    """M of ``iteration``: the previous M trained ``iterate.rnn_steps`` more steps on every series so far."""
    series_dirs = [artifacts.series_dir(data_dir)] + [artifacts.series_dir(iteration_dir(data_dir, j))
                                                       for j in range(1, iteration + 1)]
    rnn_cfg = config.apply_overrides(cfg, {"rnn.steps": cfg.iterate.rnn_steps})
    return rnn_training.train_rnn(rnn_cfg, data_dir, series_dirs=series_dirs,
                                  out=artifacts.rnn_dir(iteration_dir(data_dir, iteration)),
                                  init_path=artifacts.rnn_path(models_dir(data_dir, iteration - 1)))


def controller_config(cfg: config.Config) -> config.Config:
    """The search of every iteration: in the dream, ``iterate.generations`` generations, scored on
    ``iterate.eval_episodes`` held-out real tracks (the same tracks in every iteration).

    The CMA mean is evaluated once, after the last generation: a dream search's periodic evaluations
    select by the dream score and only watch the real one, yet each costs ``controller.eval_episodes``
    real episodes (on `small`, 40 evaluations of 16 episodes would cost ten times the collection).
    """
    return config.apply_overrides(cfg, {"controller.env": "dream", "controller.generations": cfg.iterate.generations,
                                        "controller.eval_every": cfg.iterate.generations,
                                        "controller.final_eval_episodes": cfg.iterate.eval_episodes})


def initial_controller(cfg: config.Config, data_dir) -> tuple[np.ndarray, str]:
    """Iteration 1's controller ``(params (N,), where from)``: stage 5's real-trained one, else a dream-trained
    one (``dream.temperature``'s first), else zeros (the CMA starting point)."""
    data_dir = Path(data_dir)
    tau_dir = artifacts.dream_controller_dir(data_dir, cfg.dream.temperature)
    others = sorted(data_dir.glob(f"{artifacts.DREAM_CONTROLLER_PREFIX}*"))
    for folder in [data_dir / artifacts.CONTROLLER, tau_dir, *others]:
        path = folder / artifacts.CONTROLLER_FILE
        if path.is_file():
            params, _ = controller_evaluation.load_controller(path, "params", cfg.vae.z_size, cfg.rnn.hidden_units)
            return params, str(path)
    return np.zeros(num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units)), "zeros (no controller in the data dir)"


def current_controller(cfg: config.Config, data_dir, iteration: int) -> tuple[np.ndarray, str]:
    """The controller that collects in ``iteration`` and starts its search: the previous iteration's."""
    if iteration == 1:
        return initial_controller(cfg, data_dir)
    path = iteration_dir(data_dir, iteration - 1) / artifacts.CONTROLLER / artifacts.CONTROLLER_FILE
    params, _ = controller_evaluation.load_controller(path, "params", cfg.vae.z_size, cfg.rnn.hidden_units)
    return params, str(path)


# --------------------------------------------------------------------------- the row


def read_rows(path) -> list[dict]:
    """The rows of ``iterations.csv`` as written (strings), [] if it does not exist; damaged: CorruptFileError.

    A table written before the diagnostics' columns existed reads with "nan" in them (its rows are kept as
    they are, since their iterations' M and episodes may be gone).
    """
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set(FIELDS)
    if not set(FIELDS) - set(DIAGNOSTIC_FIELDS) <= columns <= set(FIELDS) or \
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


def _series_steps(folder: Path) -> int:
    """Environment steps recorded in a folder of series (one per frame)."""
    return int(sum(sequences.check_series(storage.list_episodes(folder, artifacts.SERIES))))


def policy_counts(data_dir, iteration: int) -> str:
    """Episodes M has been trained on by policy, e.g. ``brownian:200;controller:128``: the ``policy`` tag of
    every series file of stage 3 and of iterations 1..``iteration`` (``untagged`` for files made before tags)."""
    counts = collections.Counter()
    folders = [artifacts.series_dir(data_dir)] + [artifacts.series_dir(iteration_dir(data_dir, j))
                                                   for j in range(1, iteration + 1)]
    for folder in folders:
        for path in storage.list_episodes(folder, artifacts.SERIES):
            tag = storage.load_episode(path, "series", keys=("policy",)).get("policy")
            counts["untagged" if tag is None else str(tag)] += 1
    return ";".join(f"{name}:{count}" for name, count in sorted(counts.items()))


def rnn_on_new_episodes(cfg: config.Config, iteration: int, data_dir) -> dict:
    """The previous M (the one the collecting controller was trained in) on the episodes just collected:
    z NLL with z drawn from V's posterior, reward MSE on tile steps, done AUC (``sequences.evaluate_model``),
    plus the diagnostics' columns (:func:`diagnose_new_episodes`)."""
    rnn = artifacts.load_rnn(models_dir(data_dir, iteration - 1), cfg)
    paths = storage.list_episodes(artifacts.series_dir(iteration_dir(data_dir, iteration)), artifacts.SERIES)
    m = sequences.evaluate_model(rnn, paths, cfg.rnn.sequence_length, cfg.rnn.batch_size, sample_seed=cfg.rnn.seed)
    return {**m, **diagnose_new_episodes(cfg, rnn, paths, iteration_dir(data_dir, iteration) / DIAGNOSTICS_FIGURE)}


def diagnose_new_episodes(cfg: config.Config, rnn, paths, figure) -> dict:
    """The :data:`DIAGNOSTIC_FIELDS` of M on the series ``paths``, from frame ``dream.skip_initial_frames``.

    The exploit gap of the same recorded actions from the same state (M's open loop at
    ``dream.temperature``, seeded by ``iterate.seed``, over :data:`DIAGNOSTIC_HORIZON` steps) and the
    latent error at :data:`DIAGNOSTIC_STEPS` steps ahead (NaN past the episodes' ends); both curves and
    the gap per episode are drawn to ``figure``.
    """
    episodes = [storage.load_episode(path, "series", keys=("mu", "action", "reward")) for path in paths]
    args = (rnn, episodes, cfg.dream.skip_initial_frames, DIAGNOSTIC_HORIZON, cfg.dream.temperature, cfg.iterate.seed)
    gap, latent = diagnostics.exploit_gap(*args), diagnostics.latent_error(*args)
    figures.diagnostics_figure(figure, latent, gap["gaps"])
    row = {"exploit_gap_same_actions": gap["mean"]}
    for mode, curve in (("open", latent["open_loop"]), ("teacher", latent["teacher_forced"])):
        row.update({f"latent_error_{mode}_{k}": float(curve[k - 1]) if k <= len(curve) else math.nan
                    for k in DIAGNOSTIC_STEPS})
    return row


def make_row(cfg: config.Config, iteration: int, data_dir, previous: dict | None, seconds: float) -> dict:
    """The row of ``iteration`` from its folder: real environment steps (collection, the search's held-out
    evaluations and the final score; cumulative from stage 1's episodes on), M on the new episodes, scores."""
    folder = iteration_dir(data_dir, iteration)
    out = folder / artifacts.CONTROLLER
    metrics = storage.read_json(out / artifacts.METRICS_FILE)
    evals = controller_training.read_evals(out / controller_training.EVAL_NAME)
    eval_steps = int(sum(row.get("env_steps", 0) for row in evals.values())) + int(metrics["steps"])
    collect_steps = _series_steps(artifacts.series_dir(folder))
    before = _series_steps(artifacts.series_dir(data_dir)) if previous is None else int(previous["real_env_steps"])
    m = rnn_on_new_episodes(cfg, iteration, data_dir)
    dream, real = metrics["dream"]["mean"], metrics["mean"]
    return {
        "iteration": iteration, "collect_steps": collect_steps, "eval_steps": eval_steps,
        "real_env_steps": before + collect_steps + eval_steps,
        "episodes_by_policy": policy_counts(data_dir, iteration),
        "m_z_nll_new": m["z_nll"], "m_reward_mse_tiles_new": m.get("reward_mse_tiles"),
        "m_done_auc_new": m.get("done_auc"), "dream_score": dream, "real_score": real, "real_std": metrics["std"],
        "exploit_gap": dream - real, "seconds": seconds, **{key: m[key] for key in DIAGNOSTIC_FIELDS},
    }


# --------------------------------------------------------------------------- the procedure


def run_iteration(cfg: config.Config, iteration: int, data_dir, vae, command: str = "") -> float:
    """Steps 1-4 of ``iteration`` (each skipped when complete); returns the seconds this call took."""
    start = time.perf_counter()
    params, source = current_controller(cfg, data_dir, iteration)
    log(f"iteration {iteration}: controller {source}")
    previous_rnn = artifacts.load_rnn(models_dir(data_dir, iteration - 1), cfg)
    collect_episodes(cfg, iteration, data_dir, params, vae, previous_rnn)
    encoded = encode_episodes(cfg, iteration, data_dir, vae)
    log(f"iteration {iteration}: encoded {encoded} episode(s); fine-tuning M")
    fine_tune_rnn(cfg, iteration, data_dir)
    rnn = artifacts.load_rnn(iteration_dir(data_dir, iteration), cfg)
    controller_training.train_controller(controller_config(cfg), data_dir, models=(vae, rnn), command=command,
                                         prefix=f"[06 iteration {iteration}]",
                                         out=iteration_dir(data_dir, iteration) / artifacts.CONTROLLER, x0=params)
    return time.perf_counter() - start


def check_iterations_folder(cfg: config.Config, data_dir) -> Path:
    """``<data>/iterations`` with ``config.json``; one made with other :data:`ITERATE_KEYS` is refused."""
    artifacts.require_models(data_dir, cfg)
    storage.list_episodes(artifacts.series_dir(data_dir), "latent series",
                          f"M is fine-tuned on them and the dream starts from them; make them with: "
                          f"python {artifacts.MAKERS[artifacts.SERIES]}")
    root = Path(data_dir) / ITERATIONS
    stage.check_saved_config(root, cfg, ITERATE_KEYS)
    root.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, root)
    return root


def run_iterations(cfg: config.Config, data_dir, command: str = "") -> list[dict]:
    """Run (or resume) iterations 1..``iterate.iterations``; returns the rows of ``iterations.csv``."""
    root = check_iterations_folder(cfg, data_dir)
    rows = read_rows(root / CSV_NAME)
    if len(rows) >= cfg.iterate.iterations:
        log(f"all {len(rows)} iterations are complete in {root / CSV_NAME}; nothing to do")
        return rows
    vae = artifacts.load_vision(data_dir, cfg)
    for iteration in range(len(rows) + 1, cfg.iterate.iterations + 1):
        seconds = run_iteration(cfg, iteration, data_dir, vae, command)
        row = make_row(cfg, iteration, data_dir, rows[-1] if rows else None, seconds)
        append_row(root / CSV_NAME, row)
        rows = read_rows(root / CSV_NAME)
        log(f"iteration {iteration}: real score {row['real_score']:.1f} +- {row['real_std']:.1f}, dream score "
            f"{row['dream_score']:.1f} (exploit gap {row['exploit_gap']:.1f}), {row['real_env_steps']} real "
            f"environment steps so far -> {root / CSV_NAME}")
    return rows
