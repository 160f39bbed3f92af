"""Stage 5: evolve C, the linear controller, with CMA-ES in the real CarRacing-v3 -> ``<data-dir>/controller/``.

    python 05_train_controller.py --preset small
    python 05_train_controller.py --set controller.workers=16 --max-concurrent 1024
    python 05_train_controller.py --set controller.backend=ray --set controller.ray_address=auto

Every generation CMA-ES proposes ``controller.population`` controllers, and each drives
``controller.rollouts_per_member`` episodes; its fitness is the mean return. The training
tracks are drawn from the search's own random stream, the same tracks for every member of a
generation (so members are ranked on equal terms). All episodes of a generation run at once
in a pool of environment workers, with one batched V, M and C call per step
(``worldmodels.rollout``). Every ``controller.eval_every`` generations (and after the last)
the CMA mean is scored on ``controller.eval_episodes`` fixed held-out tracks, and the best
scoring mean is kept as the controller (as the paper's code did). At the end that controller
is scored on ``controller.final_eval_episodes`` further held-out tracks (the reported score).

Resumable: the search is checkpointed after every generation (``worldmodels.evolution``);
after Ctrl-C or SIGKILL rerun the same command, and it continues to the same result as an
uninterrupted run. A finished run reruns as a no-op; a larger ``controller.generations``
continues it.

Writes ``controller/``: ``config.json``, ``evolution.pkl`` and ``history.csv`` (per
generation: best, mean, std, worst fitness, sigma), ``eval.csv`` (generation, mean, std on
the held-out tracks), ``controller.npz`` (``params``: the best held-out CMA mean; ``mean``:
the current CMA mean; ``best_member``), ``learning_curve.png``, ``logs/`` (TensorBoard) and
``metrics.json`` (final evaluation; skipped with ``--no-final-eval``).
"""

from __future__ import annotations

import csv
import io
import math
import shlex
import sys
import time

import numpy as np
from tqdm import tqdm

import config
from models.controller import num_parameters
from worldmodels import artifacts, cli, envpool, rollout, storage
from worldmodels.evolution import Evolution

# TensorFlow is imported in train(), after the checks: a missing model or a corrupt checkpoint
# is reported at once, and the spawned environment workers (which re-import this script) stay small.

# What defines a search: a controller/ folder made with other values is not continued.
COMPATIBLE_KEYS = artifacts.RNN_KEYS + (
    "controller.env", "controller.population", "controller.rollouts_per_member", "controller.sigma_init",
    "controller.weight_decay", "controller.max_steps", "controller.eval_episodes", "controller.seed",
)
EVAL_NAME = "eval.csv"
EVAL_FIELDS = ("generation", "mean", "std")
CONTROLLER_NAME = "controller.npz"
METRICS_NAME = "metrics.json"
DEFAULT_MAX_CONCURRENT = 256


def training_tracks(rng: np.random.Generator, count: int, exclude: np.ndarray) -> np.ndarray:
    """``count`` track seeds from ``rng``, redrawing any that is a held-out track (never train on those)."""
    seeds = rng.integers(0, 2**31, size=count)
    clash = np.isin(seeds, exclude)
    while clash.any():
        seeds[clash] = rng.integers(0, 2**31, size=int(clash.sum()))
        clash = np.isin(seeds, exclude)
    return seeds


def read_evals(path) -> dict[int, tuple[float, float]]:
    """``eval.csv`` -> {generation: (mean, std)}; a damaged file is a CorruptFileError."""
    if not path.exists():
        return {}
    try:
        with open(path, newline="") as f:
            return {int(row["generation"]): (float(row["mean"]), float(row["std"])) for row in csv.DictReader(f)}
    except (KeyError, TypeError, ValueError) as exc:
        raise storage.CorruptFileError(f"{path} is not a valid evaluation log ({exc}); delete it to redo "
                                       "the held-out evaluations of the current CMA mean only") from exc


def write_evals(path, evals: dict) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(EVAL_FIELDS)
    writer.writerows([g, m, s] for g, (m, s) in sorted(evals.items()))
    storage.atomic_write_text(path, buffer.getvalue())


def read_best(path, num_params: int):
    """The best held-out mean so far from ``controller.npz``: (generation, score, params) or None."""
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


def plot_learning_curve(path, history: list[dict], evals: dict) -> None:
    """Best and mean fitness per generation and the held-out evaluations, as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    generations = [row["generation"] for row in history]
    ax.plot(generations, [row["best"] for row in history], label="best member (training tracks)")
    ax.plot(generations, [row["mean"] for row in history], label="population mean (training tracks)")
    if evals:
        g = sorted(evals)
        ax.errorbar(g, [evals[i][0] for i in g], yerr=[evals[i][1] for i in g], fmt="o-", capsize=3,
                    label="CMA mean on held-out tracks (+- std)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("return")
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


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--env", choices=["real", "dream"], help="where to score controllers (overrides controller.env)")
    parser.add_argument("--no-final-eval", action="store_true", help="skip the final evaluation (metrics.json)")
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                        help=f"at most N environments at once (memory: ~4 MB each; default {DEFAULT_MAX_CONCURRENT})")
    cfg, args = config.parse_args(__doc__, argv, parser)
    if args.env:
        cfg = config.apply_overrides(cfg, {"controller.env": args.env})
    if cfg.controller.env == "dream":
        raise config.ConfigError("controller.env='dream' (training C in M's dream) is not implemented yet; "
                                 "use --env real")
    if args.max_concurrent < 1:
        parser.error(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    envpool.check_backend(cfg.controller.backend)  # e.g. Ray not installed: say so before any slow work
    # Fail before the slow imports if V or M is missing (load_world_models checks their configs).
    for path, command in ((artifacts.vision_path(args.data_dir, cfg), "python 02_train_vae.py"),
                          (artifacts.rnn_path(args.data_dir), "python 04_train_rnn.py")):
        if not path.exists():
            raise storage.MissingDataError(f"no trained model at {path}; make it first with: {command}")

    out = args.data_dir / "controller"
    saved = out / "config.json"
    if saved.exists():
        config.check_compatible(config.load_config(saved), cfg, COMPATIBLE_KEYS, str(out))
    c = cfg.controller
    num_params = num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units)
    evolution = Evolution(num_params, out, popsize=c.population, sigma0=c.sigma_init, seed=c.seed,
                          weight_decay=c.weight_decay)
    config.save_config(cfg, out)
    evals = read_evals(out / EVAL_NAME)
    best = read_best(out / CONTROLLER_NAME, num_params)

    g = evolution.generation
    eval_pending = g > 0 and g not in evals and (g % c.eval_every == 0 or g == c.generations)
    final_done = args.no_final_eval or final_metrics_done(out / METRICS_NAME, g, c.final_eval_episodes, c.max_steps)
    if g >= c.generations and not eval_pending and final_done:
        print(f"[05] {out}: all {g} generations and evaluations are complete; nothing to do")
        return 0
    return train(cfg, args, out, evolution, evals, best, argv)


def train(cfg, args, out, evolution, evals, best, argv) -> int:
    import tensorflow as tf

    from worldmodels.devices import describe_devices

    c = cfg.controller
    print(f"[05] {describe_devices()}")
    vae, rnn = rollout.load_world_models(args.data_dir, cfg)
    members, k = c.population, c.rollouts_per_member
    num_envs = min(args.max_concurrent, max(members * k, c.eval_episodes, c.final_eval_episodes))
    eval_seeds = rollout.heldout_seeds(c.seed, c.eval_episodes, rollout.EVAL_SEED_OFFSET)
    final_seeds = rollout.heldout_seeds(c.seed, c.final_eval_episodes, rollout.FINAL_EVAL_SEED_OFFSET)
    heldout = np.concatenate([eval_seeds, final_seeds])
    writer = tf.summary.create_file_writer(str(out / "logs"))
    speed = {"steps": 0, "seconds": 0.0}
    state = {"best": best}

    print(f"[05] {out}: {evolution.generation} of {c.generations} generations done; population {members} x "
          f"{k} episode(s) of <= {c.max_steps} steps, {num_envs} envs on backend '{c.backend}'")
    with envpool.CarRacingPool(num_envs, c.max_steps, c.backend, c.workers, c.ray_address) as pool:
        world = rollout.RealWorld(pool, vae, rnn)

        def fitness(solutions, generation, rng):
            tracks = training_tracks(rng, k, heldout)
            start = time.perf_counter()
            result = rollout.run_episodes(world, solutions, np.tile(tracks, (len(solutions), 1)), c.max_steps,
                                          args.max_concurrent)
            speed["steps"] += int(result.lengths.sum())
            speed["seconds"] += time.perf_counter() - start
            return result.returns.mean(axis=1)

        def maybe_evaluate(bar):
            g = evolution.generation
            if g == 0 or g in evals or not (g % c.eval_every == 0 or g == c.generations):
                return
            result = rollout.evaluate(world, evolution.mean, eval_seeds, c.max_steps, args.max_concurrent)
            if state["best"] is None or result["mean"] > state["best"][1]:
                state["best"] = (g, result["mean"], evolution.mean)
            # The controller file first: if a kill lands between the two writes, the evaluation
            # is redone on resume (deterministically, with the same score).
            save_controller(out / CONTROLLER_NAME, evolution, state["best"], cfg.vae.z_size, cfg.rnn.hidden_units)
            evals[g] = (result["mean"], result["std"])
            write_evals(out / EVAL_NAME, evals)
            with writer.as_default(step=g):
                tf.summary.scalar("heldout/mean", result["mean"])
                tf.summary.scalar("heldout/std", result["std"])
            writer.flush()
            plot_learning_curve(out / "learning_curve.png", evolution.history, evals)
            bar.write(f"[05] generation {g}: CMA mean scores {result['mean']:.1f} +- {result['std']:.1f} on "
                      f"{len(eval_seeds)} held-out tracks (best so far: {state['best'][1]:.1f} at generation "
                      f"{state['best'][0]})")

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
            plot_learning_curve(out / "learning_curve.png", evolution.history, evals)
            bar.update(1)
            bar.set_postfix(best=f"{row['best']:.1f}", mean=f"{row['mean']:.1f}", std=f"{row['std']:.1f}",
                            steps_s=f"{steps_per_s:.0f}")

        with tqdm(total=c.generations, initial=min(evolution.generation, c.generations), unit="gen",
                  desc="CMA-ES", dynamic_ncols=True) as bar:
            maybe_evaluate(bar)  # an evaluation lost to a kill right after its generation
            while evolution.generation < c.generations:
                evolution.run(fitness, evolution.generation + 1, on_generation=lambda row: on_generation(row, bar))
                maybe_evaluate(bar)
        save_controller(out / CONTROLLER_NAME, evolution, state["best"], cfg.vae.z_size, cfg.rnn.hidden_units)
        plot_learning_curve(out / "learning_curve.png", evolution.history, evals)
        if speed["seconds"]:
            print(f"[05] {speed['steps']} agent steps in {speed['seconds']:.1f} s "
                  f"({speed['steps'] / speed['seconds']:.0f} steps/s)")

        if args.no_final_eval:
            print(f"[05] done: {out / CONTROLLER_NAME} (final evaluation skipped)")
        elif final_metrics_done(out / METRICS_NAME, evolution.generation, c.final_eval_episodes, c.max_steps):
            print(f"[05] done: final evaluation already in {out / METRICS_NAME}")
        else:
            params = state["best"][2] if state["best"] else evolution.mean
            metrics = rollout.final_evaluation(world, params, cfg, max_concurrent=args.max_concurrent)
            metrics.update(
                generation=evolution.generation, controller=str(out / CONTROLLER_NAME), which="params",
                selected_at_generation=state["best"][0] if state["best"] else evolution.generation,
                command=shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]),
            )
            storage.atomic_write_json(out / METRICS_NAME, metrics)
            print(f"[05] final evaluation on {metrics['episodes']} held-out tracks: {metrics['mean']:.1f} +- "
                  f"{metrics['std']:.1f} (min {metrics['min']:.1f}, max {metrics['max']:.1f}) -> {out / METRICS_NAME}")
    return 0


if __name__ == "__main__":
    cli.run(main)
