"""Does streaming frames from disk cost V training speed, and does its memory stay flat? Measured side by side.

    python benchmarks/bench_vae_input.py                  # ~2-3 minutes on 2 CPU cores
    python benchmarks/bench_vae_input.py --episodes 48 --steps 40

One run builds a temporary dataset from real CarRacing rollouts (a few episodes recorded with
stage 1's code, each saved under several episode names, so the files compress and
decompress like real data) and measures:

1. Throughput: frames/s of ConvVAE training steps fed by ``datasets.frame_dataset`` (streaming
   from the files) and by an in-memory uint8 tensor of the same frames (``from_tensor_slices``,
   same shuffle buffer and batch size), in alternating rounds so that load from other
   processes hits both alike. Target: streaming >= 0.9x in-memory. On a busy machine the
   rounds vary by +-20%, so it also prints the time spent reading and inflating the frames
   relative to the time spent training on them, which load does not blur.
2. Memory: peak RSS (``VmHWM``) of one full training epoch (``training.train``, as
   02_train_vae.py runs it) on the dataset and on one twice as large, each in a fresh
   subprocess, for the streaming pipeline and for the in-memory one. Target: streaming peak
   equal within 10% for 1x and 2x data; the in-memory peak grows with the data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from worldmodels import collect, datasets, storage  # noqa: E402  (after the TensorFlow log level)

SHUFFLE_BUFFER = 1000
EPISODES_IN_FLIGHT = 4


def make_dataset(folder: Path, episodes: int, distinct: int, steps: int) -> list[Path]:
    """``episodes`` rollout files in ``folder``: ``distinct`` real episodes, each saved under several names."""
    folder.mkdir(parents=True, exist_ok=True)
    originals = [collect.record_episode(steps, "brownian", seed) for seed in range(distinct)]
    paths = []
    for i in range(episodes):
        path = folder / storage.episode_name(i)
        storage.save_episode(path, originals[i % distinct])
        paths.append(path)
    return paths


def memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark's memory part needs Linux)")


def build_model():
    import keras

    from models.vae import ConvVAE

    keras.utils.set_random_seed(0)
    model = ConvVAE(seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    return model


def in_memory_dataset(frames, batch_size: int, seed: int):
    """The usual in-memory pipeline: the whole uint8 array as one tensor, shuffled and batched."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices(frames).shuffle(SHUFFLE_BUFFER, seed=seed)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def load_all_frames(paths):
    import numpy as np

    return np.concatenate([storage.load_episode(p, keys=("obs",))["obs"] for p in paths])


def streaming_dataset(paths, batch_size: int, epoch: int):
    return datasets.frame_dataset(paths, batch_size, SHUFFLE_BUFFER, EPISODES_IN_FLIGHT, seed=0, epoch=epoch)


def measure_throughput(paths, batch_size: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """frames/s of training steps per input pipeline, alternating the two pipelines over ``rounds``."""
    model = build_model()
    model.make_train_function()
    frames = load_all_frames(paths)
    results = {"streaming": [], "in-memory": []}
    for r in range(rounds):
        for name in results:
            # One epoch each (as training uses them); the dataset must hold warm-up + timed steps.
            dataset = (streaming_dataset(paths, batch_size, r) if name == "streaming"
                       else in_memory_dataset(frames, batch_size, r))
            iterator = iter(dataset)
            # Warm-up: tracing on the first round, filling the shuffle buffer on every round.
            for _ in range(3):
                model.train_function(iterator)
            start = time.perf_counter()
            for _ in range(steps):
                logs = model.train_function(iterator)
            float(logs["loss"])  # waits for the last step
            results[name].append(steps * batch_size / (time.perf_counter() - start))
    return results


def child(mode: str, folder: Path, batch_size: int) -> None:
    """One full training epoch with one pipeline; prints peak and baseline RSS as JSON."""
    from worldmodels import training

    paths = storage.list_episodes(folder)
    frames_total = datasets.count_frames(paths)
    model = build_model()
    baseline = memory_mb("VmRSS")
    frames = load_all_frames(paths) if mode == "in-memory" else None

    def make(epoch):
        return streaming_dataset(paths, batch_size, epoch) if mode == "streaming" \
            else in_memory_dataset(frames, batch_size, epoch)

    with tempfile.TemporaryDirectory() as checkpoints:
        start = time.perf_counter()
        training.train(model, make, datasets.steps_per_epoch(frames_total, batch_size), 1, checkpoints,
                       checkpoint_every_seconds=None, log=lambda message: None)
        seconds = time.perf_counter() - start
    # ru_maxrss is not used: Linux carries the parent's peak over fork + exec into the child's
    # ru_maxrss, so every child would report this benchmark's own (larger) peak. VmHWM is the
    # peak of the child's own address space.
    print(json.dumps({"peak_mb": memory_mb("VmHWM"), "baseline_mb": baseline, "frames": frames_total,
                      "seconds": seconds,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(mode: str, folder: Path, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=24, help="episode files of the 1x dataset")
    parser.add_argument("--episode-steps", type=int, default=200, help="frames per recorded episode")
    parser.add_argument("--distinct", type=int, default=4, help="real episodes recorded (reused under many names)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per throughput round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating throughput rounds per pipeline")
    parser.add_argument("--child", choices=["streaming", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.folder, args.batch_size)
        return

    root = Path(tempfile.mkdtemp(prefix="bench_vae_input_"))
    try:
        start = time.perf_counter()
        small = make_dataset(root / "1x" / "rollouts", args.episodes, args.distinct, args.episode_steps)
        shutil.copytree(root / "1x", root / "2x")
        for i, path in enumerate(small):
            shutil.copy(path, root / "2x" / "rollouts" / storage.episode_name(args.episodes + i))
        frames_1x = datasets.count_frames(small)
        size_mb = sum(p.stat().st_size for p in small) / 2**20
        print(f"dataset: {args.episodes} episode files, {frames_1x} frames ({frames_1x * 12288 / 2**20:.0f} MB "
              f"of frames, {size_mb:.0f} MB on disk) and twice that; built in {time.perf_counter() - start:.0f} s")
        print(f"pipelines: batch {args.batch_size}, shuffle buffer {SHUFFLE_BUFFER} frames, "
              f"{EPISODES_IN_FLIGHT} episodes in flight; {os.cpu_count()} CPU(s)\n")

        if frames_1x // args.batch_size < args.steps + 3:
            parser.error(f"{frames_1x} frames make fewer than --steps + 3 = {args.steps + 3} batches of "
                         f"{args.batch_size}; use more --episodes or fewer --steps")
        speed = measure_throughput(small, args.batch_size, args.steps, args.rounds)
        stream, memory = statistics.median(speed["streaming"]), statistics.median(speed["in-memory"])
        print("1. training throughput (ConvVAE, frames/s, median of rounds)")
        print(f"   {'pipeline':<12} {'median':>8}   rounds")
        for name, values in speed.items():
            print(f"   {name:<12} {statistics.median(values):8.0f}   " + " ".join(f"{v:.0f}" for v in values))
        print(f"   streaming / in-memory = {stream / memory:.2f}x  (target >= 0.9x)")
        # A noise-free bound on the cost: reading and inflating the frames on one thread, next to training.
        start_read = time.perf_counter()
        read = sum(len(storage.load_episode(p, keys=("obs",))["obs"]) for p in small)
        read_rate = read / (time.perf_counter() - start_read)
        print(f"   reading + inflating alone: {read_rate:.0f} frames/s on one thread, i.e. "
              f"{100 * memory / read_rate:.1f}% of the CPU time of a training step per frame\n")

        print("2. peak RSS of one training epoch, each in a fresh process")
        print(f"   {'pipeline':<12} {'data':>4} {'frames':>7} {'epoch s':>8} {'peak MB':>8} {'peak - before MB':>17}")
        peaks = {}
        for mode in ("streaming", "in-memory"):
            for scale in ("1x", "2x"):
                r = run_child(mode, root / scale / "rollouts", args.batch_size)
                peaks[mode, scale] = r["peak_mb"]
                print(f"   {mode:<12} {scale:>4} {r['frames']:7d} {r['seconds']:8.1f} {r['peak_mb']:8.0f} "
                      f"{r['peak_mb'] - r['baseline_mb']:17.0f}")
        for mode in ("streaming", "in-memory"):
            print(f"   {mode}: peak RSS 2x / 1x = {peaks[mode, '2x'] / peaks[mode, '1x']:.3f}"
                  + ("  (target: within 10%)" if mode == "streaming" else ""))
        print(f"\ntotal {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
