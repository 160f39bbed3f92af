"""Score a trained controller on held-out tracks, full episodes: per-track CSV, mean +- std, IQM.

    python evaluate_controller.py                                   # controller/: its config, 100 final tracks
    python evaluate_controller.py --track-seed 7 --episodes 50      # your own 50 tracks
    python evaluate_controller.py --pretrained carracing-cpu        # the shipped agent, no training needed
    python evaluate_controller.py --set controller.z_input=mean     # the same tracks, C fed V's posterior mean
    python evaluate_controller.py --episodes 10 --video car.gif     # + a full-resolution video of the first track
    python evaluate_controller.py --which mean --replace-metrics    # the last CMA mean, into controller/metrics.json
    python evaluate_controller.py --set env.observation=fast        # the same tracks on the fast observation
    python evaluate_controller.py --profile                         # + how it drove: tiles, laps, speed, grass

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
``--profile`` replays every episode to read the car (~5 s a track on a 2-core machine shared
3 ways; the replay draws the fast frames, which the physics does not need but CarRacing's step
does) and adds per track the tiles visited of the track's tiles, the step that finished the lap (if any),
the mean speed, the share of steps off the road, the mean gas and brake, and their means to the
JSON's ``profile`` (what limits a score: a car that finishes few laps in 1000 steps is slow or
cuts corners; one often off the road loses tiles there).
``metrics.json`` of stage 5 is replaced only with ``--replace-metrics``. The video replays
the first track's recorded actions in a CarRacing-v3 rendered at full size
(``render_mode='rgb_array'``); ``.gif`` always works, ``.mp4`` needs ``imageio`` with ffmpeg.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import config
from worldmodels import artifacts, cli, rollout, storage
from worldmodels.controller_evaluation import (WHICH, evaluation_path, final_tracks_base, load_agent, replay_frames,
                                               score_on_tracks, video_writer_check, write_track_csv, write_video)
from worldmodels.driving import profile_episode, profile_summary

# TensorFlow is imported when the models are loaded, after the checks (see 05_train_controller.py).

def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.set_defaults(preset=None)  # None: the controller's own preset (an explicit one is checked against it)
    parser.add_argument("--controller", type=Path, help="controller file or its folder, e.g. "
                                                        "<data-dir>/controller_dream_t1 (default: <data-dir>/controller); "
                                                        "it drives with the M beside its folder (an iteration's "
                                                        "controller: its iteration's M), else <data-dir>'s")
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
    parser.add_argument("--profile", action="store_true", help="also replay every episode to read how the car drove "
                                                               "(tiles, laps, speed, off-road share) into the results")
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
    agent = load_agent(args.data_dir, args.preset, args.overrides, pretrained_name=args.pretrained,
                       controller_path=args.controller, which=args.which, replace_metrics=args.replace_metrics)
    cfg, folder, c = agent.cfg, agent.folder, agent.cfg.controller
    episodes = c.final_eval_episodes if args.episodes is None else args.episodes
    base = final_tracks_base(cfg) if args.track_seed is None else args.track_seed
    output = (folder / artifacts.METRICS_FILE if args.replace_metrics
              else args.output or evaluation_path(folder, base, episodes))

    print(f"[eval] {agent.description}, generation {agent.generation}, on {episodes} tracks (episode_seed({base}, i)) of "
          f"<= {c.max_steps} steps, z: {c.z_input}, {cfg.env.observation} observation")
    # Without recorded actions (a video or a profile) each finished wave is kept, so a killed scoring resumes.
    record = bool(args.video or args.profile)
    partial = None if record else rollout.checkpoint_for(output)
    metrics = score_on_tracks(cfg, agent.vae, agent.rnn, agent.params, base, episodes, args.max_concurrent, record,
                              partial)
    actions = metrics.pop("actions", None)
    metrics.update(agent=agent.description, which=args.which, generation=agent.generation,
                   command=shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]))
    if args.video:
        replayed = {}
        count = write_video(replay_frames(metrics["seeds"][0], actions[0], c.max_steps, replayed), args.video)
        if replayed["return"] != metrics["scores"][0]:
            print(f"[eval] warning: the replayed episode scored {replayed['return']:.3f}, "
                  f"the evaluation {metrics['scores'][0]:.3f}", file=sys.stderr)
        metrics["video"] = {"path": str(args.video), "frames": count, "seed": metrics["seeds"][0],
                            "score": metrics["scores"][0]}
        print(f"[eval] video of track {metrics['seeds'][0]} ({count} frames) -> {args.video}")
    if args.profile:
        from tqdm import tqdm

        profiles = [profile_episode(seed, track_actions, c.max_steps) for seed, track_actions
                    in tqdm(list(zip(metrics["seeds"], actions)), desc="profile (replay)", unit="track")]
        mismatched = sum(p.pop("return") != score for p, score in zip(profiles, metrics["scores"]))
        if mismatched:
            print(f"[eval] warning: {mismatched} replayed episode(s) scored otherwise than evaluated", file=sys.stderr)
        metrics["profile"] = {**profile_summary(profiles), "replays_mismatched": mismatched, "tracks_profile": profiles}
        p = metrics["profile"]
        print(f"[eval] profile: {p['laps_finished']} of {p['tracks']} laps finished; tiles visited "
              f"{100 * p['mean_tile_share']:.1f}% on average; mean speed {p['mean_mean_speed']:.1f} units/s; "
              f"off the road {100 * p['mean_off_road']:.1f}% of steps; gas {p['mean_mean_gas']:.2f}, "
              f"brake {p['mean_mean_brake']:.2f}")
    storage.atomic_write_json(output, metrics)
    write_track_csv(output.with_suffix(".csv"), metrics)
    if partial is not None:
        partial.unlink(missing_ok=True)
    low, high = metrics["iqm_ci95"]
    print(f"[eval] {metrics['mean']:.1f} +- {metrics['std']:.1f} (standard error {metrics['sem']:.1f}; min "
          f"{metrics['min']:.1f}, max {metrics['max']:.1f}); IQM {metrics['iqm']:.1f} [{low:.1f}, {high:.1f}] "
          f"(95% bootstrap) over {episodes} tracks -> {output} and {output.with_suffix('.csv').name}")
    return 0


def console() -> None:
    """The ``wm-evaluate`` command of ``pip install -e .``: :func:`main` with one-line user errors."""
    cli.run(main)


if __name__ == "__main__":
    console()
