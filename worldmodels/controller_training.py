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
live side by side. Each holds ``config.json``, ``evolution.pkl``, ``history.csv`` (per
generation: best, mean, std, worst fitness - dream returns when training in the dream -
and sigma), ``eval.csv`` (generation, mean, std on the real held-out tracks; plus
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

import csv
import io
import math
import time
from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import artifacts, envpool, rollout, storage
from worldmodels.evolution import Evolution

COMPATIBLE_KEYS = artifacts.CONTROLLER_KEYS
DREAM_KEYS = artifacts.DREAM_KEYS
EVAL_NAME = "eval.csv"
EVAL_FIELDS = ("generation", "mean", "std")
DREAM_EVAL_FIELDS = EVAL_FIELDS + ("dream_mean", "dream_std")
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
            return {int(row["generation"]): {key: float(value) for key, value in row.items() if key != "generation"}
                    for row in csv.DictReader(f)}
    except (KeyError, TypeError, ValueError) as exc:
        raise storage.CorruptFileError(f"{path} is not a valid evaluation log ({exc}); delete it to redo "
                                       "the held-out evaluations of the current CMA mean only") from exc


def write_evals(path, evals: dict, fields=EVAL_FIELDS) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows([g] + [row[key] for key in fields[1:]] for g, row in sorted(evals.items()))
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


def plot_learning_curve(path, history: list[dict], evals: dict, dream_temperature: float | None = None) -> None:
    """Fitness per generation and the held-out evaluations (real, and dream if any), as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    where = "training tracks" if dream_temperature is None else f"dream, tau={dream_temperature:g}"
    fig, ax = plt.subplots(figsize=(7, 4))
    generations = [row["generation"] for row in history]
    ax.plot(generations, [row["best"] for row in history], label=f"best member ({where})")
    ax.plot(generations, [row["mean"] for row in history], label=f"population mean ({where})")
    if evals:
        g = sorted(evals)
        ax.errorbar(g, [evals[i]["mean"] for i in g], yerr=[evals[i]["std"] for i in g], fmt="o-", capsize=3,
                    label="CMA mean on held-out real tracks (+- std)")
        if dream_temperature is not None:
            ax.errorbar(g, [evals[i]["dream_mean"] for i in g], yerr=[evals[i]["dream_std"] for i in g],
                        fmt="s--", capsize=3, label="CMA mean on held-out dream episodes (+- std)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
    if dream_temperature is not None:
        ax.set_title(f"controller trained in the dream (tau={dream_temperature:g})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.atomic_write_bytes(path, buffer.getvalue())


def final_metrics_done(path, generation: int, episodes: int, max_steps: int) -> bool:
    try:
        old = storage.read_json(path)
    except (storage.MissingDataError, storage.CorruptFileError):
        return False
    return (old.get("generation"), old.get("episodes"), old.get("max_steps")) == (generation, episodes, max_steps)


def check_inputs(data_dir, cfg: config.Config) -> None:
    """Fail before the slow imports if V, M (or, for the dream, the latent series) are missing."""
    artifacts.require_models(data_dir, cfg)
    if cfg.controller.env == "dream":
        storage.list_episodes(Path(data_dir) / artifacts.SERIES, "latent series",
                              f"The dream starts from them; make them with: python {artifacts.MAKERS[artifacts.SERIES]}")


# --------------------------------------------------------------------------- training


def train_controller(cfg: config.Config, data_dir, *, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
                     final_eval: bool = True, command: str = "", models=None, prefix: str = "[05]") -> dict:
    """Run (or resume, or do nothing if complete) the search of ``cfg`` in ``output_dir(data_dir, cfg)``.

    Args:
        cfg: the resolved config; ``controller.env`` says where members are scored.
        data_dir: folder holding ``vae/`` (or ``vae_gan/``), ``rnn/`` and, for the dream, ``series/``.
        max_concurrent: at most this many real environments at once (~4 MB each).
        final_eval: score the selected controller on the final held-out tracks (``metrics.json``).
        command: the command line recorded in ``metrics.json``.
        models: (V, M) already loaded, to skip loading them (e.g. once for a whole study).
        prefix: how log lines start.

    Returns:
        ``{"out": Path, "generation": int, "evals": {generation: row}, "metrics": dict or None,
        "models": (V, M) or None}`` with ``metrics`` the content of ``metrics.json`` if it exists
        and ``models`` the models used (None if there was nothing to do), to pass on to a next call.
    """
    if int(max_concurrent) != max_concurrent or max_concurrent < 1:
        raise ValueError(f"max_concurrent must be a positive integer, got {max_concurrent!r}")
    envpool.check_backend(cfg.controller.backend)  # e.g. Ray not installed: say so before any slow work
    check_inputs(data_dir, cfg)
    out = output_dir(data_dir, cfg)
    saved = out / artifacts.CONFIG_FILE
    if saved.exists():
        config.check_compatible(config.load_config(saved), cfg, compatible_keys(cfg), str(out))
    c = cfg.controller
    num_params = num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units)
    evolution = Evolution(num_params, out, popsize=c.population, sigma0=c.sigma_init, seed=c.seed,
                          weight_decay=c.weight_decay)
    config.save_config(cfg, out)
    evals = read_evals(out / EVAL_NAME)
    best = read_best(out / CONTROLLER_NAME, num_params)

    g = evolution.generation
    eval_pending = g > 0 and g not in evals and (g % c.eval_every == 0 or g == c.generations)
    final_done = not final_eval or final_metrics_done(out / METRICS_NAME, g, c.final_eval_episodes, c.max_steps)
    if not (g >= c.generations and not eval_pending and final_done):
        models = _train(cfg, data_dir, out, evolution, evals, best, max_concurrent, final_eval, command, models,
                        prefix)
    else:
        print(f"{prefix} {out}: all {g} generations and evaluations are complete; nothing to do")
    try:
        metrics = storage.read_json(out / METRICS_NAME)
    except storage.MissingDataError:
        metrics = None
    return {"out": out, "generation": evolution.generation, "evals": read_evals(out / EVAL_NAME), "metrics": metrics,
            "models": models}


def _train(cfg, data_dir, out, evolution, evals, best, max_concurrent, final_eval, command, models, prefix):
    """The search, evaluations and final evaluation of :func:`train_controller`; returns (V, M)."""
    import tensorflow as tf

    from worldmodels.devices import describe_devices

    c = cfg.controller
    in_dream = c.env == "dream"
    print(f"{prefix} {describe_devices()}")
    vae, rnn = models if models is not None else rollout.load_world_models(data_dir, cfg)
    members, k = c.population, c.rollouts_per_member
    num_envs = min(max_concurrent, max(c.eval_episodes, c.final_eval_episodes) if in_dream
                   else max(members * k, c.eval_episodes, c.final_eval_episodes))
    eval_seeds = rollout.heldout_seeds(c.seed, c.eval_episodes, rollout.EVAL_SEED_OFFSET)
    final_seeds = rollout.heldout_seeds(c.seed, c.final_eval_episodes, rollout.FINAL_EVAL_SEED_OFFSET)
    heldout = np.concatenate([eval_seeds, final_seeds])
    writer = tf.summary.create_file_writer(str(out / "logs"))
    speed = {"steps": 0, "seconds": 0.0}
    state = {"best": best}
    tau = cfg.dream.temperature if in_dream else None
    fields = DREAM_EVAL_FIELDS if in_dream else EVAL_FIELDS
    dream = None
    if in_dream:
        from worldmodels import dream as dream_lib

        starts = dream_lib.start_states_for(data_dir, cfg)
        dream = dream_lib.dream_world(cfg, rnn, starts)
        print(f"{prefix} dream at temperature {tau:g}: {len(starts)} starting frames (frame "
              f"{cfg.dream.skip_initial_frames} of each series), {dream.capacity} agents per step, "
              f"done head: {dream.done}, dropout masks: {dream.dropout}")

    train_where = (f"the dream ({cfg.dream.max_steps} steps, {dream.capacity} agents at once)" if in_dream
                   else f"{num_envs} envs on backend '{c.backend}'")
    print(f"{prefix} {out}: {evolution.generation} of {c.generations} generations done; population {members} x "
          f"{k} episode(s) of <= {cfg.dream.max_steps if in_dream else c.max_steps} steps in {train_where}")
    with envpool.CarRacingPool(num_envs, c.max_steps, c.backend, c.workers, c.ray_address) as pool:
        world = rollout.RealWorld(pool, vae, rnn)
        train_world, train_steps, train_concurrent = ((dream, cfg.dream.max_steps, None) if in_dream
                                                      else (world, c.max_steps, max_concurrent))

        def fitness(solutions, generation, rng):
            tracks = training_tracks(rng, k, heldout)
            start = time.perf_counter()
            result = rollout.run_episodes(train_world, solutions, np.tile(tracks, (len(solutions), 1)), train_steps,
                                          train_concurrent)
            speed["steps"] += int(result.lengths.sum())
            speed["seconds"] += time.perf_counter() - start
            return result.returns.mean(axis=1)

        def maybe_evaluate(bar):
            g = evolution.generation
            if g == 0 or g in evals or not (g % c.eval_every == 0 or g == c.generations):
                return
            result = rollout.evaluate(world, evolution.mean, eval_seeds, c.max_steps, max_concurrent,
                                      progress=f"generation {g}: held-out tracks")
            row = {"mean": result["mean"], "std": result["std"]}
            if in_dream:
                dreamed = rollout.evaluate(dream, evolution.mean, eval_seeds, cfg.dream.max_steps)
                row.update(dream_mean=dreamed["mean"], dream_std=dreamed["std"])
            score = row["dream_mean" if in_dream else "mean"]
            if state["best"] is None or score > state["best"][1]:
                state["best"] = (g, score, evolution.mean)
            # The controller file first: if a kill lands between the two writes, the evaluation
            # is redone on resume (deterministically, with the same score).
            save_controller(out / CONTROLLER_NAME, evolution, state["best"], cfg.vae.z_size, cfg.rnn.hidden_units)
            evals[g] = row
            write_evals(out / EVAL_NAME, evals, fields)
            with writer.as_default(step=g):
                tf.summary.scalar("heldout/mean", row["mean"])
                tf.summary.scalar("heldout/std", row["std"])
                if in_dream:
                    tf.summary.scalar("heldout_dream/mean", row["dream_mean"])
                    tf.summary.scalar("heldout_dream/std", row["dream_std"])
            writer.flush()
            plot_learning_curve(out / "learning_curve.png", evolution.history, evals, tau)
            dreamed = f" (dream: {row['dream_mean']:.1f} +- {row['dream_std']:.1f})" if in_dream else ""
            bar.write(f"{prefix} generation {g}: CMA mean scores {row['mean']:.1f} +- {row['std']:.1f} on "
                      f"{len(eval_seeds)} held-out tracks{dreamed} (best so far: {state['best'][1]:.1f} at "
                      f"generation {state['best'][0]})")

        def on_generation(row, bar):
            g = row["generation"]
            steps_per_s = speed["steps"] / max(speed["seconds"], 1e-9)
            with writer.as_default(step=g):
                for name in ("best", "mean", "std", "worst"):
                    tf.summary.scalar(f"fitness/{name}", row[name])
                tf.summary.scalar("cma/sigma", row["sigma"])
                tf.summary.scalar("speed/agent_steps_per_s", steps_per_s)
            writer.flush()
            save_controller(out / CONTROLLER_NAME, evolution, state["best"], cfg.vae.z_size, cfg.rnn.hidden_units)
            plot_learning_curve(out / "learning_curve.png", evolution.history, evals, tau)
            bar.update(1)
            bar.set_postfix(best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}", std=f"{row['std']:.1f}",
                            steps_s=f"{steps_per_s:.0f}")

        from tqdm import tqdm

        with tqdm(total=c.generations, initial=min(evolution.generation, c.generations), unit="gen",
                  desc="CMA-ES" + (f" (dream, tau={tau:g})" if in_dream else ""), dynamic_ncols=True) as bar:
            maybe_evaluate(bar)  # an evaluation lost to a kill right after its generation
            while evolution.generation < c.generations:
                evolution.run(fitness, evolution.generation + 1, on_generation=lambda row: on_generation(row, bar))
                maybe_evaluate(bar)
        save_controller(out / CONTROLLER_NAME, evolution, state["best"], cfg.vae.z_size, cfg.rnn.hidden_units)
        plot_learning_curve(out / "learning_curve.png", evolution.history, evals, tau)
        if speed["seconds"]:
            print(f"{prefix} {speed['steps']} agent steps in {speed['seconds']:.1f} s "
                  f"({speed['steps'] / speed['seconds']:.0f} steps/s{' in the dream' if in_dream else ''})")

        if not final_eval:
            print(f"{prefix} done: {out / CONTROLLER_NAME} (final evaluation skipped)")
        elif final_metrics_done(out / METRICS_NAME, evolution.generation, c.final_eval_episodes, c.max_steps):
            print(f"{prefix} done: final evaluation already in {out / METRICS_NAME}")
        else:
            params = state["best"][2] if state["best"] else evolution.mean
            metrics = rollout.final_evaluation(world, params, cfg, max_concurrent=max_concurrent,
                                               progress="final evaluation")
            metrics.update(
                generation=evolution.generation, controller=str(out / CONTROLLER_NAME), which="params",
                selected_at_generation=state["best"][0] if state["best"] else evolution.generation,
                env=c.env, command=command,
            )
            if in_dream:
                dreamed = rollout.evaluate(dream, params, final_seeds, cfg.dream.max_steps)
                metrics["dream"] = {key: dreamed[key] for key in ("mean", "std", "min", "max", "scores", "lengths")}
                metrics["dream"].update(temperature=tau, max_steps=cfg.dream.max_steps, episodes=len(final_seeds))
            storage.atomic_write_json(out / METRICS_NAME, metrics)
            dreamed = (f"; in the dream {metrics['dream']['mean']:.1f} +- {metrics['dream']['std']:.1f}"
                       if in_dream else "")
            print(f"{prefix} final evaluation on {metrics['episodes']} held-out tracks: {metrics['mean']:.1f} +- "
                  f"{metrics['std']:.1f} (min {metrics['min']:.1f}, max {metrics['max']:.1f}){dreamed} -> "
                  f"{out / METRICS_NAME}")
    return vae, rnn
