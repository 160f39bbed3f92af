"""Stage-3 throughput: 03's encoding loop vs a bare batched V call, measured side by side.

    python benchmarks/bench_encode.py                # ~1 minute on 2 cores

Both encode the same frames with the same (untrained: speed does not depend on weights)
ConvVAE in batches of ``--batch`` frames. The bare call has the frames in memory as float32
already; 03 reads compressed episodes from disk, decompresses, encodes and writes series
files. Target: 03 >= 0.8x the bare call.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from models.vae import ConvVAE
from worldmodels import encode, storage
from worldmodels.collect import record_episode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1000, help="frames per V call (rnn.encode_batch_size)")
    args = parser.parse_args()

    vision = ConvVAE(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        rollouts, series = Path(tmp) / "rollouts", Path(tmp) / "series"
        # Two real episodes, saved under several names: the content is real CarRacing frames.
        real = [record_episode(args.steps, "brownian", seed) for seed in (1, 2)]
        for i in range(args.episodes):
            storage.save_episode(rollouts / storage.episode_name(i), real[i % 2])
        frames = np.concatenate([real[i % 2]["obs"] for i in range(args.episodes)])
        paths = storage.list_episodes(rollouts)

        vision.encode(frames[: args.batch], chunk_size=args.batch)  # warm-up: build and trace once
        in_memory = frames.astype(np.float32) / 255.0
        start = time.perf_counter()
        vision.encode(in_memory, chunk_size=args.batch)
        bare = len(frames) / (time.perf_counter() - start)

        start = time.perf_counter()
        count = sum(encode.encode_rollouts(vision, paths, series, args.batch))
        streamed = count / (time.perf_counter() - start)

    print(f"{'measurement':<52} {'frames/s':>9} {'ratio':>7}  target")
    print(f"{'bare batched V call, float32 frames in memory':<52} {bare:9.0f} {1.0:7.2f}")
    print(f"{'03 encoding loop (read, decompress, encode, write)':<52} {streamed:9.0f} {streamed / bare:7.2f}  >= 0.8")
    print(f"({len(frames)} frames, batches of {args.batch})")


if __name__ == "__main__":
    main()
