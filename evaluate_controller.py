"""Score a trained controller on held-out tracks -> ``<data-dir>/controller/metrics.json``.

    python evaluate_controller.py --preset small                    # controller.final_eval_episodes (paper: 100)
    python evaluate_controller.py --episodes 10 --video car.gif      # + a full-resolution video of the first track
    python evaluate_controller.py --which mean --output other.json   # the last CMA mean instead of the best one
    python evaluate_controller.py --set env.observation=fast --output fast.json   # on the fast observation

The tracks come from the final-evaluation seed stream (never used for training or for
picking the controller), so the score is comparable with the paper's "mean +- std over 100
random tracks". ``metrics.json`` holds mean, std, min, max, the score, length and seed of
every track, and the command line. The video replays the first track's recorded actions in
a CarRacing-v3 rendered at full size (``render_mode='rgb_array'``); ``.gif`` always works,
``.mp4`` needs ``imageio`` with ffmpeg (``pip install imageio[ffmpeg]``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import artifacts, cli, envpool, rollout, storage

# TensorFlow is imported in evaluate_saved(), after the checks (see 05_train_controller.py).

WHICH = ("params", "mean", "best_member")
VIDEO_FPS = 50  # CarRacing's simulation rate


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


def evaluate_saved(cfg, data_dir: Path, params: np.ndarray, episodes: int, max_concurrent: int,
                   record_actions: bool) -> dict:
    """Load V and M, run ``params`` on the final-evaluation tracks, return rollout.final_evaluation's dict."""
    vae, rnn = rollout.load_world_models(data_dir, cfg)
    c = cfg.controller
    with envpool.CarRacingPool(min(episodes, max_concurrent), c.max_steps, c.backend, c.workers,
                               c.ray_address, observation=cfg.env.observation) as pool:
        world = rollout.RealWorld(pool, vae, rnn)
        return rollout.final_evaluation(world, params, cfg, episodes, max_concurrent, record_actions,
                                        progress="held-out tracks")


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--controller", type=Path, help="controller file (default: <data-dir>/controller/controller.npz)")
    parser.add_argument("--which", choices=WHICH, default="params",
                        help="params: the CMA mean with the best held-out score (default); mean: the last CMA "
                             "mean; best_member: the member with the best training fitness")
    parser.add_argument("--episodes", type=int, help="held-out tracks (default: controller.final_eval_episodes)")
    parser.add_argument("--output", type=Path, help="metrics file (default: <data-dir>/controller/metrics.json)")
    parser.add_argument("--video", type=Path, metavar="PATH.gif|PATH.mp4", help="also record the first track")
    parser.add_argument("--max-concurrent", type=int, default=256, metavar="N", help="at most N environments at once")
    cfg, args = config.parse_args(__doc__, argv, parser)
    episodes = cfg.controller.final_eval_episodes if args.episodes is None else args.episodes
    if episodes < 1 or args.max_concurrent < 1:
        parser.error("--episodes and --max-concurrent must be >= 1")
    if args.video:
        video_writer_check(args.video)
    envpool.check_backend(cfg.controller.backend)  # e.g. Ray not installed: say so before any slow work
    folder = args.data_dir / "controller"
    path = args.controller or folder / "controller.npz"
    output = args.output or folder / "metrics.json"
    if cfg.env.observation != "stock" and output.resolve() == (folder / "metrics.json").resolve():
        raise config.ConfigError(f"{output} holds the reported score, always measured on the stock observation; "
                                 f"write a score on env.observation={cfg.env.observation} elsewhere with --output PATH")
    for model_path, command in ((artifacts.vision_path(args.data_dir, cfg), "python 02_train_vae.py"),
                                (artifacts.rnn_path(args.data_dir), "python 04_train_rnn.py")):
        if not model_path.exists():
            raise storage.MissingDataError(f"no trained model at {model_path}; make it first with: {command}")
    params, info = load_controller(path, args.which, cfg.vae.z_size, cfg.rnn.hidden_units)

    print(f"[eval] {path} ({args.which}, generation {info.get('generation', '?')}) on {episodes} held-out tracks "
          f"of <= {cfg.controller.max_steps} steps, {cfg.env.observation} observation")
    metrics = evaluate_saved(cfg, args.data_dir, params, episodes, args.max_concurrent, bool(args.video))
    actions = metrics.pop("actions", None)
    metrics.update(controller=str(path), which=args.which, generation=info.get("generation"),
                   observation=cfg.env.observation,
                   command=shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]))
    if args.video:
        replayed = {}
        count = write_video(replay_frames(metrics["seeds"][0], actions[0], cfg.controller.max_steps, replayed),
                            args.video)
        if replayed["return"] != metrics["scores"][0]:
            print(f"[eval] warning: the replayed episode scored {replayed['return']:.3f}, "
                  f"the evaluation {metrics['scores'][0]:.3f}", file=sys.stderr)
        metrics["video"] = {"path": str(args.video), "frames": count, "seed": metrics["seeds"][0],
                            "score": metrics["scores"][0]}
        print(f"[eval] video of track {metrics['seeds'][0]} ({count} frames) -> {args.video}")
    storage.atomic_write_json(output, metrics)
    print(f"[eval] {metrics['mean']:.1f} +- {metrics['std']:.1f} (min {metrics['min']:.1f}, max "
          f"{metrics['max']:.1f}) over {episodes} tracks -> {output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
