"""Stage 1: record rollouts of the exploration policies of CarRacing-v3 into ``<data-dir>/rollouts/``.

    python 01_generate_data.py --preset small            # 200 episodes, all cores
    python 01_generate_data.py --set data.episodes=50 --set data.workers=2
    python 01_generate_data.py --backend ray --ray-address auto   # on a Ray cluster
    python 01_generate_data.py --set data.policy=controller:0.9,brownian:0.1   # 90% from <data-dir>/controller

Each episode ``i`` is seeded from ``(data.seed, i)`` and saved atomically as
``rollouts/episode_<i>.npz``, so an interrupted run (Ctrl-C, SIGKILL, a terminated
instance) loses at most the episodes in flight: rerun the same command to finish. One episode
is recorded by ``worldmodels/collect.py`` (the exploration policies are in ``worldmodels/policies.py``);
the episodes of the ``controller`` policy are driven through V and M in waves by ``worldmodels/recording.py``.
"""

from __future__ import annotations

import time

from tqdm import tqdm

import config
from worldmodels import artifacts, cli, collect, recording, storage
from worldmodels.parallel import parallel_map, resolve_workers


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--backend", choices=["serial", "process", "ray"], help="overrides data.backend")
    parser.add_argument("--ray-address", default="", help="Ray cluster address for --backend ray ('' = local)")
    cfg, args = config.parse_args(__doc__, argv, parser)
    if args.backend:
        cfg = config.apply_overrides(cfg, {"data.backend": args.backend})
    folder = artifacts.rollouts_dir(args.data_dir)
    folder.mkdir(parents=True, exist_ok=True)

    saved_path = folder / artifacts.CONFIG_FILE
    if saved_path.exists():
        config.check_compatible(config.load_config(saved_path), cfg, recording.rollout_keys(cfg), f"{folder}")
    config.save_config(cfg, folder)

    pending, notes = collect.pending_indices(folder, cfg.data.episodes)
    for note in notes:
        print(f"[01] {note}")
    done = cfg.data.episodes - len(pending)
    workers = resolve_workers(cfg.data.workers)
    print(f"[01] {folder}: {done} of {cfg.data.episodes} episodes already complete; recording {len(pending)} "
          f"with policy '{cfg.data.policy}' on {workers} worker(s), backend '{cfg.data.backend}', "
          f"{cfg.env.observation} observation")
    driven = recording.record_controller_share(cfg, args.data_dir, folder, pending, args.ray_address)
    blind = sorted(set(pending) - set(recording.controller_episodes(cfg)))
    jobs = [collect.EpisodeJob(i, str(folder), cfg.data.seed, cfg.data.max_steps, cfg.data.policy,
                               cfg.data.compresslevel, observation=cfg.env.observation,
                               expert_noise=cfg.data.expert_noise) for i in blind]
    frames, peak_mb, start = 0, 0.0, time.perf_counter()
    with tqdm(total=cfg.data.episodes, initial=done + driven, unit="ep", desc="rollouts", dynamic_ncols=True) as bar:
        for result in parallel_map(collect.run_job, jobs, cfg.data.backend, workers, args.ray_address):
            frames += result.frames
            peak_mb = max(peak_mb, result.peak_rss_mb)
            bar.update(1)
            bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")
    extra = [p for p in storage.list_episodes(folder) if storage.episode_index(p) >= cfg.data.episodes] \
        if cfg.data.episodes else []
    if extra:
        print(f"[01] note: {len(extra)} episode(s) beyond data.episodes={cfg.data.episodes} are also in {folder} "
              "and will be used by later stages")
    seconds = time.perf_counter() - start
    if frames:
        print(f"[01] recorded {frames} frames in {seconds:.1f} s ({frames / seconds:.0f} frames/s); "
              f"peak worker memory {peak_mb:.0f} MB")
    print(f"[01] done: {cfg.data.episodes} episodes in {folder}")
    return 0


if __name__ == "__main__":
    cli.run(main)
