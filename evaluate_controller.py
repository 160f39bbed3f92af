"""Score a trained controller on held-out tracks -> ``<data-dir>/controller/metrics.json``.

    python evaluate_controller.py --preset small                    # controller.final_eval_episodes (paper: 100)
    python evaluate_controller.py --episodes 10 --video car.gif      # + a full-resolution video of the first track
    python evaluate_controller.py --which mean --output other.json   # the last CMA mean instead of the best one

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

import config
from worldmodels import artifacts, cli, envpool, storage
from worldmodels.controller_evaluation import (WHICH, evaluate_saved, load_controller, replay_frames,
                                               video_writer_check, write_video)

# TensorFlow is imported in evaluate_saved(), after the checks (see 05_train_controller.py).


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
    folder = args.data_dir / artifacts.CONTROLLER
    path = args.controller or folder / artifacts.CONTROLLER_FILE
    output = args.output or folder / artifacts.METRICS_FILE
    artifacts.require_models(args.data_dir, cfg)
    params, info = load_controller(path, args.which, cfg.vae.z_size, cfg.rnn.hidden_units)

    print(f"[eval] {path} ({args.which}, generation {info.get('generation', '?')}) on {episodes} held-out tracks "
          f"of <= {cfg.controller.max_steps} steps")
    metrics = evaluate_saved(cfg, args.data_dir, params, episodes, args.max_concurrent, bool(args.video))
    actions = metrics.pop("actions", None)
    metrics.update(controller=str(path), which=args.which, generation=info.get("generation"),
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


def console() -> None:
    """The ``wm-evaluate`` command of ``pip install -e .``: :func:`main` with one-line user errors."""
    cli.run(main)


if __name__ == "__main__":
    console()
