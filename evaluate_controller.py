"""Score a trained controller on held-out tracks, full episodes: per-track CSV, mean +- std, IQM.

    python evaluate_controller.py                                   # controller/: its config, 100 final tracks
    python evaluate_controller.py --track-seed 7 --episodes 50      # your own 50 tracks
    python evaluate_controller.py --pretrained carracing-cpu        # the shipped agent, no training needed
    python evaluate_controller.py --set controller.z_input=mean     # the same tracks, C fed V's posterior mean
    python evaluate_controller.py --episodes 10 --video car.gif     # + a full-resolution video of the first track
    python evaluate_controller.py --which mean --replace-metrics    # the last CMA mean, into controller/metrics.json
    python evaluate_controller.py --set env.observation=fast        # the same tracks on the fast observation

The config (preset, step limit, V, M, what C sees) is the one saved in the controller's
folder (``config.json``); an explicit ``--preset`` that differs is an error, and a ``--set``
that changes a saved value is applied with a warning naming it (e.g. to compare
``controller.z_input``). Track i is ``episode_seed(track_seed, i)`` for i < ``--episodes``; the
default base is the final-evaluation stream (``2,000,000 + controller.seed``, never used for
training or for picking the controller), so by default the score is the one of
``metrics.json``, comparable with the paper's "mean +- std over 100 random tracks".

Writes ``<controller folder>/evaluation_s<base>_n<count>.json`` and ``.csv`` (or ``--output``
and the CSV beside it): the CSV has one row per track (track, seed, return, steps); the JSON
holds mean, std, its standard error, the interquartile mean (IQM, the mean of the middle
half: per-track returns are bimodal, a car finishes a track or leaves it) with a 95%
bootstrap interval, min, max, every track's score, length and seed, and the command line.
``metrics.json`` of stage 5 is replaced only with ``--replace-metrics``. The video replays
the first track's recorded actions in a CarRacing-v3 rendered at full size
(``render_mode='rgb_array'``); ``.gif`` always works, ``.mp4`` needs ``imageio`` with ffmpeg.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import artifacts, cli, envpool, rollout, storage

# TensorFlow is imported when the models are loaded, after the checks (see 05_train_controller.py).

WHICH = ("params", "mean", "best_member")
VIDEO_FPS = 50  # CarRacing's simulation rate
BOOTSTRAP_RESAMPLES = 10_000


def load_controller(path: Path, which: str, z_size: int, hidden: int) -> tuple[np.ndarray, dict]:
    """Parameters ``which`` (N,) from a ``controller.npz`` of 05_train_controller.py, and its scalars."""
    num_params = num_parameters(z_size, hidden)
    if not path.exists():
        raise storage.MissingDataError(f"no controller at {path}; train one first with: python 05_train_controller.py")
    try:
        with np.load(path) as data:
            params = np.array(data[which], dtype=np.float64)
            info = {key: data[key].item() for key in data.files if data[key].ndim == 0}
    except Exception as exc:  # zip, zlib and key errors all mean the file is unusable
        raise storage.CorruptFileError(f"{path} is not a readable controller file ({type(exc).__name__}: {exc})") from exc
    if params.shape != (num_params,):
        raise config.ConfigError(f"{path} holds parameters of shape {params.shape}, but vae.z_size={z_size} and "
                                 f"rnn.hidden_units={hidden} need ({num_params},): use the config it was trained with")
    if not np.all(np.isfinite(params)):
        raise storage.CorruptFileError(f"{path}: parameters {which!r} are not finite")
    return params, info


def video_writer_check(path: Path) -> None:
    """Fail before any work if the video cannot be written."""
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise config.ConfigError(f"--video must end in .gif or .mp4, got {path}")
    if suffix == ".mp4":
        try:
            import imageio.v2  # noqa: F401
        except ImportError:
            raise config.ConfigError("an .mp4 video needs imageio with ffmpeg: pip install 'imageio[ffmpeg]' "
                                     "(or write a .gif)") from None


def replay_frames(seed: int, actions: np.ndarray, max_steps: int, result: dict):
    """Yield full-resolution RGB frames (400, 600, 3) of CarRacing replaying ``actions`` (T, 3) on track ``seed``.

    The pool's episodes are deterministic given the seed and actions, so this replay is the
    evaluated episode; ``result["return"]`` holds its return afterwards, for a check.
    """
    from worldmodels.env import make_env

    env = make_env(max_steps, render_mode="rgb_array")
    total = 0.0
    try:
        env.reset(seed=int(seed))
        yield env.render()
        for action in actions:
            _, reward, terminated, truncated, _ = env.step(action)
            total += reward
            yield env.render()
            if terminated or truncated:
                break
    finally:
        env.close()
        result["return"] = total


def write_video(frames, path: Path, fps: int = VIDEO_FPS) -> int:
    """Write RGB frames to ``path`` (.gif or .mp4) atomically; returns the number of frames.

    imageio streams frames to disk when it is installed. Otherwise a .gif is written with
    Pillow (what matplotlib's PillowWriter uses too), keeping each frame as a 1-byte
    palette image, a third of the memory of the RGB frame.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        import imageio.v2 as imageio
    except ImportError:
        imageio = None
    count = 0
    if imageio is not None:
        def write(f):
            nonlocal count
            kwargs = {"duration": 1000 / fps, "loop": 0} if suffix == ".gif" else {"fps": fps}
            with imageio.get_writer(f, format=suffix[1:], **kwargs) as writer:
                for frame in frames:
                    writer.append_data(frame)
                    count += 1
        storage.atomic_write(path, write)
        return count
    from PIL import Image

    images = [Image.fromarray(frame).quantize(colors=256, method=Image.Quantize.MEDIANCUT) for frame in frames]
    if not images:
        raise ValueError("no frames to write")

    def write_gif(f):
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)

    storage.atomic_write(path, write_gif)
    return len(images)


def interquartile_mean(scores) -> float:
    """The mean of the middle half of ``scores`` (E,): a quarter of the sorted values cut at each end."""
    ordered = np.sort(np.asarray(scores, np.float64))
    cut = len(ordered) // 4
    return float(ordered[cut:len(ordered) - cut].mean())


def summarise(scores, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """mean, std, standard error, IQM and its 95% percentile-bootstrap interval of per-track returns (E,).

    The bootstrap resamples the tracks with replacement ``resamples`` times from a fixed ``seed``,
    so the interval is reproducible.
    """
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    if n == 0:
        raise ValueError("no scores to summarise")
    samples = np.sort(scores[np.random.default_rng(seed).integers(0, n, size=(resamples, n))], axis=1)
    cut = n // 4
    iqms = samples[:, cut:n - cut].mean(axis=1)
    low, high = np.percentile(iqms, [2.5, 97.5])
    return {"mean": float(scores.mean()), "std": float(scores.std()), "sem": float(scores.std(ddof=1) / np.sqrt(n))
            if n > 1 else 0.0, "iqm": interquartile_mean(scores), "iqm_ci95": [float(low), float(high)],
            "bootstrap_resamples": resamples}


def write_track_csv(path: Path, metrics: dict) -> None:
    """One row per track: index, seed, return, steps (atomically)."""
    rows = ["track,seed,return,steps"] + [f"{i},{seed},{score!r},{steps}" for i, (seed, score, steps)
                                          in enumerate(zip(metrics["seeds"], metrics["scores"], metrics["lengths"]))]
    storage.atomic_write_text(path, "\n".join(rows) + "\n")


def resolve_config(args, parser, folder: Path) -> config.Config:
    """The controller's saved config with the explicit ``--set`` applied (each change a warning);
    an explicit ``--preset`` that differs from the saved one is an error. No saved config: as given."""
    try:
        overrides = config.parse_set_arguments(args.overrides)
        saved_path = folder / "config.json"
        if not saved_path.exists():
            return config.make_config(args.preset or config.DEFAULT_PRESET, overrides)
        saved = config.load_config(saved_path)
        if args.preset is not None and args.preset != saved.preset:
            raise config.ConfigError(f"--preset {args.preset} disagrees with {saved_path} (preset {saved.preset}); "
                                     "the controller's own config is used: drop --preset")
        # Scores are measured on gymnasium's stock pixels whatever a search trained on (env.observation
        # of a fast-trained controller is 'fast'); only an explicit --set env.observation asks otherwise.
        cfg = config.apply_overrides(config.apply_overrides(saved, {"env.observation": "stock"}), overrides)
    except config.ConfigError as exc:
        parser.error(str(exc))
    changed = [f"{key}={config.get(cfg, key)!r} (trained with {config.get(saved, key)!r})" for key in overrides
               if config.get(cfg, key) != config.get(saved, key)]
    if changed:
        print(f"[eval] warning: evaluating with settings other than the controller's: {', '.join(changed)}",
              file=sys.stderr)
    return cfg


@contextlib.contextmanager
def real_world(cfg, vae, rnn, num_envs: int):
    """A RealWorld on a fresh pool of ``num_envs`` CarRacing envs drawing ``cfg.env.observation``, as
    ``cfg.controller`` says (closed after)."""
    c = cfg.controller
    with envpool.CarRacingPool(num_envs, c.max_steps, c.backend, c.workers, c.ray_address,
                               observation=cfg.env.observation) as pool:
        yield rollout.RealWorld(pool, vae, rnn, c.z_input)


def evaluate_params(cfg, vae, rnn, params: np.ndarray, seeds: np.ndarray, max_concurrent: int,
                    record_actions: bool) -> dict:
    """Run ``params`` (N,) with V and M on tracks ``seeds`` (E,), full episodes; rollout.evaluate's dict."""
    with real_world(cfg, vae, rnn, min(len(seeds), max_concurrent)) as world:
        return rollout.evaluate(world, params, seeds, cfg.controller.max_steps, max_concurrent, record_actions,
                                progress="held-out tracks")


def evaluate_saved(cfg, data_dir: Path, params: np.ndarray, episodes: int, max_concurrent: int,
                   record_actions: bool) -> dict:
    """Load V and M from ``data_dir``, run ``params`` on the first ``episodes`` final-evaluation tracks,
    return rollout.final_evaluation's dict (what the driving animation of worldmodels.figures uses)."""
    vae, rnn = rollout.load_world_models(data_dir, cfg)
    with real_world(cfg, vae, rnn, min(episodes, max_concurrent)) as world:
        return rollout.final_evaluation(world, params, cfg, episodes, max_concurrent, record_actions,
                                        progress="held-out tracks")


def load_agent(args, parser):
    """``(cfg, V, M, params, description, folder, generation)`` of ``--pretrained`` or of a controller
    under ``--data-dir``."""
    if args.pretrained:
        from worldmodels import pretrained

        cfg, vae, rnn, params, info = pretrained.load(args.pretrained)
        where = pretrained.folder(args.pretrained)
        cfg = resolve_config(args, parser, where)
        return cfg, vae, rnn, params, f"pretrained agent {where}", where, info["generation"]
    path = args.controller or args.data_dir / "controller" / "controller.npz"
    cfg = resolve_config(args, parser, path.parent)
    if cfg.env.observation != "stock" and args.replace_metrics:
        raise config.ConfigError(f"{path.parent / 'metrics.json'} holds the reported score, always measured on the "
                                 f"stock observation; write a score on env.observation={cfg.env.observation} "
                                 "elsewhere (drop --replace-metrics, or --output PATH)")
    envpool.check_backend(cfg.controller.backend)  # e.g. Ray not installed: say so before any slow work
    for model_path, command in ((artifacts.vision_path(args.data_dir, cfg), "python 02_train_vae.py"),
                                (artifacts.rnn_path(args.data_dir), "python 04_train_rnn.py")):
        if not model_path.exists():
            raise storage.MissingDataError(f"no trained model at {model_path}; make it first with: {command}")
    params, info = load_controller(path, args.which, cfg.vae.z_size, cfg.rnn.hidden_units)
    vae, rnn = rollout.load_world_models(args.data_dir, cfg)
    return cfg, vae, rnn, params, f"{path} ({args.which})", path.parent, info.get("generation")


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.set_defaults(preset=None)  # None: the controller's own preset (an explicit one is checked against it)
    parser.add_argument("--controller", type=Path, help="controller file (default: <data-dir>/controller/controller.npz)")
    parser.add_argument("--pretrained", metavar="NAME", help="score the agent in pretrained/NAME/ (checked against "
                                                             "its SHA-256 manifest) instead of a trained one")
    parser.add_argument("--which", choices=WHICH, default="params",
                        help="params: the CMA mean with the best held-out score (default); mean: the last CMA "
                             "mean; best_member: the member with the best training fitness")
    parser.add_argument("--episodes", type=int, help="number of tracks (default: controller.final_eval_episodes)")
    parser.add_argument("--track-seed", type=int, help="base seed of the tracks: track i is episode_seed(BASE, i) "
                                                       "(default: the final-evaluation stream, 2000000 + controller.seed)")
    parser.add_argument("--output", type=Path, help="results file (default: <controller folder>/evaluation_s<base>_"
                                                    "n<count>.json, with the per-track .csv beside it)")
    parser.add_argument("--replace-metrics", action="store_true", help="write the controller folder's metrics.json "
                                                                       "(stage 5's reported score) instead")
    parser.add_argument("--video", type=Path, metavar="PATH.gif|PATH.mp4", help="also record the first track")
    parser.add_argument("--max-concurrent", type=int, default=256, metavar="N", help="at most N environments at once")
    args = parser.parse_args(argv)
    if args.help_config:
        print(config.describe())
        return 0
    if args.episodes is not None and args.episodes < 1 or args.max_concurrent < 1:
        parser.error("--episodes and --max-concurrent must be >= 1")
    if args.output and args.replace_metrics:
        parser.error("give --output or --replace-metrics, not both")
    if args.video:
        video_writer_check(args.video)
    cfg, vae, rnn, params, description, folder, generation = load_agent(args, parser)
    c = cfg.controller
    episodes = c.final_eval_episodes if args.episodes is None else args.episodes
    base = rollout.FINAL_EVAL_SEED_OFFSET + c.seed if args.track_seed is None else args.track_seed
    seeds = rollout.heldout_seeds(base, episodes, offset=0)
    output = (folder / "metrics.json" if args.replace_metrics
              else args.output or folder / f"evaluation_s{base}_n{episodes}.json")

    print(f"[eval] {description}, generation {generation}, on {episodes} tracks (episode_seed({base}, i)) of "
          f"<= {c.max_steps} steps, z: {c.z_input}, {cfg.env.observation} observation")
    metrics = evaluate_params(cfg, vae, rnn, params, seeds, args.max_concurrent, bool(args.video))
    actions = metrics.pop("actions", None)
    metrics.update(summarise(metrics["scores"]))
    metrics.update(episodes=episodes, track_seed=base, seed_stream=f"episode_seed({base}, i)", max_steps=c.max_steps,
                   z_input=c.z_input, observation=cfg.env.observation, preset=cfg.preset, agent=description, which=args.which,
                   generation=generation, command=shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]))
    if args.video:
        replayed = {}
        count = write_video(replay_frames(metrics["seeds"][0], actions[0], c.max_steps, replayed), args.video)
        if replayed["return"] != metrics["scores"][0]:
            print(f"[eval] warning: the replayed episode scored {replayed['return']:.3f}, "
                  f"the evaluation {metrics['scores'][0]:.3f}", file=sys.stderr)
        metrics["video"] = {"path": str(args.video), "frames": count, "seed": metrics["seeds"][0],
                            "score": metrics["scores"][0]}
        print(f"[eval] video of track {metrics['seeds'][0]} ({count} frames) -> {args.video}")
    storage.atomic_write_json(output, metrics)
    write_track_csv(output.with_suffix(".csv"), metrics)
    low, high = metrics["iqm_ci95"]
    print(f"[eval] {metrics['mean']:.1f} +- {metrics['std']:.1f} (standard error {metrics['sem']:.1f}; min "
          f"{metrics['min']:.1f}, max {metrics['max']:.1f}); IQM {metrics['iqm']:.1f} [{low:.1f}, {high:.1f}] "
          f"(95% bootstrap) over {episodes} tracks -> {output} and {output.with_suffix('.csv').name}")
    return 0


if __name__ == "__main__":
    cli.run(main)
