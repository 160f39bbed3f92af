"""Stage 3: encode every rollout with V into latent series under ``<data-dir>/series/``.

    python 03_generate_rnn_data.py --preset small
    python 03_generate_rnn_data.py --set vae.model=vae_gan     # use the VAE-GAN as V

Each ``series/episode_<i>.npz`` holds V's posterior (mu, logvar) of every frame with the
actions, rewards and done flags of ``rollouts/episode_<i>.npz``. Files are written
atomically; rerunning skips finished episodes, so an interrupted run just continues. The
encoding is ``worldmodels/encode.py``.
"""

from __future__ import annotations

import time

from tqdm import tqdm

import config
from worldmodels import artifacts, cli, encode, stage, storage
from worldmodels.devices import describe_devices



def main(argv=None) -> int:
    cfg, args = config.parse_args(__doc__, argv)
    rollout_paths = storage.list_episodes(artifacts.rollouts_dir(args.data_dir), artifacts.ROLLOUTS,
                                          f"Record them first with: python {artifacts.MAKERS[artifacts.ROLLOUTS]}")
    series_dir = artifacts.series_dir(args.data_dir)
    stage.check_saved_config(series_dir, cfg, artifacts.SERIES_KEYS)
    print(f"[03] {describe_devices()}")
    vision = artifacts.load_vision(args.data_dir, cfg)
    series_dir.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, series_dir)

    pending = encode.pending_episodes(rollout_paths, series_dir)
    print(f"[03] {len(rollout_paths) - len(pending)} of {len(rollout_paths)} episodes already encoded; "
          f"encoding {len(pending)} with {cfg.vae.model} in batches of {cfg.rnn.encode_batch_size}")
    frames, start = 0, time.perf_counter()
    with tqdm(total=len(rollout_paths), initial=len(rollout_paths) - len(pending), unit="ep", desc="encode",
              dynamic_ncols=True) as bar:
        for count in encode.encode_rollouts(vision, pending, series_dir, cfg.rnn.encode_batch_size):
            frames += count
            bar.update(1)
            bar.set_postfix(frames_per_s=f"{frames / (time.perf_counter() - start):.0f}")
    if frames:
        seconds = time.perf_counter() - start
        print(f"[03] encoded {frames} frames in {seconds:.1f} s ({frames / seconds:.0f} frames/s)")
    print(f"[03] done: {len(rollout_paths)} series in {series_dir}")
    return 0


if __name__ == "__main__":
    cli.run(main)
