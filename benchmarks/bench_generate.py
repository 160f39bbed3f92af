"""Stage-1 speed, memory and disk use, measured side by side in one run.

    python benchmarks/bench_generate.py            # ~1 minute on 2 cores
    python benchmarks/bench_generate.py --steps 1000 --episodes 8

Prints:
* bare `make_env` CarRacing-v3 random-action frames/s on one process (the baseline; `make_env`
  draws the same pixels faster than gymnasium as shipped, see `bench_env.py`);
* ``01_generate_data.py`` frames/s with 1 and with 2 workers, as ratios to the baseline
  (targets on a 2-core machine: >= 0.85x and >= 1.6x);
* the peak memory of a generating worker for N and 2N episodes (target: no growth);
* disk space per 1000 episodes of ``--steps`` frames, from the files written.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from worldmodels import storage
from worldmodels.env import make_env


def bare_frames_per_second(steps: int, max_steps: int) -> float:
    """Plain gymnasium loop with random actions: physics + rendering, nothing else."""
    env = make_env(max_steps)
    env.action_space.seed(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    seconds = time.perf_counter() - start
    env.close()
    return steps / seconds


def run_generate(data_dir: Path, episodes: int, max_steps: int, workers: int) -> dict:
    """Run 01_generate_data.py as a user would and parse what it reports."""
    cmd = [sys.executable, str(REPO / "01_generate_data.py"), "--preset", "smoke", "--data-dir", str(data_dir),
           "--set", f"data.episodes={episodes}", "--set", f"data.max_steps={max_steps}",
           "--set", f"data.workers={workers}"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - start
    match = re.search(r"recorded (\d+) frames in ([\d.]+) s .* peak worker memory (\d+) MB", out)
    if not match:
        raise RuntimeError(f"unexpected output of 01_generate_data.py:\n{out}")
    frames, seconds, peak = int(match[1]), float(match[2]), float(match[3])
    paths = storage.list_episodes(data_dir / "rollouts")
    sizes = [p.stat().st_size for p in paths]
    lengths = [len(storage.load_episode(p, keys=["action"])["action"]) for p in paths]
    return {"frames": frames, "fps": frames / seconds, "fps_wall": frames / wall, "peak_mb": peak,
            "bytes_per_frame": sum(sizes) / sum(lengths), "mean_length": float(np.mean(lengths))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="time limit of each generated episode")
    parser.add_argument("--episodes", type=int, default=4, help="episodes per worker in the speed runs")
    args = parser.parse_args()

    bare = bare_frames_per_second(steps=args.steps * 4, max_steps=args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        one = run_generate(Path(tmp) / "w1", args.episodes, args.steps, workers=1)
        two = run_generate(Path(tmp) / "w2", 2 * args.episodes, args.steps, workers=2)
        small = run_generate(Path(tmp) / "m1", 2, args.steps, workers=1)
        large = run_generate(Path(tmp) / "m2", 4, args.steps, workers=1)

    print(f"{'measurement':<48} {'value':>12} {'ratio':>8}  target")
    print(f"{'bare make_env loop, random actions, 1 process':<48} {bare:9.0f} f/s {1.0:8.2f}")
    print(f"{'01_generate_data.py, 1 worker':<48} {one['fps']:9.0f} f/s {one['fps'] / bare:8.2f}  >= 0.85")
    print(f"{'01_generate_data.py, 2 workers':<48} {two['fps']:9.0f} f/s {two['fps'] / bare:8.2f}  >= 1.6")
    print(f"{'  (2 workers, incl. interpreter start-up)':<48} {two['fps_wall']:9.0f} f/s {two['fps_wall'] / bare:8.2f}")
    print(f"{'peak worker memory, 2 episodes':<48} {small['peak_mb']:10.0f} MB")
    print(f"{'peak worker memory, 4 episodes':<48} {large['peak_mb']:10.0f} MB "
          f"{large['peak_mb'] / small['peak_mb']:8.2f}  ~1.0 (no growth)")
    per_1000 = one["bytes_per_frame"] * 1000 * 1000 / 2**30
    print(f"disk: {one['bytes_per_frame'] / 1024:.1f} KiB per frame (mean episode length "
          f"{one['mean_length']:.0f} of {args.steps}); 1000 episodes of 1000 frames = {per_1000:.1f} GiB")


if __name__ == "__main__":
    main()
