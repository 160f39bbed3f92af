"""How close the fast observation is to the stock one: pixels, classes, and (given a trained V) latents.

    python benchmarks/parity_fast_obs.py                     # 6 tracks x 300 steps, ~1 minute
    python benchmarks/parity_fast_obs.py --data-dir /work/runs/gan --set vae.model=vae_gan   # + V's latents

Drives ``make_env()`` (gymnasium's own drawing, identical pixels) with the Brownian policy of
stage 1 on ``--seeds`` tracks that no stage trains on, and at every state, the first second's
zoom-in included, compares the stock 64x64 frame (``preprocess`` of the 96x96 state) with the
fast one drawn from the same state (``worldmodels.fast_render.render_observation``):

* |difference| in intensity levels (0..255): mean, 99th percentile, max, share of pixels
  that differ at all and by more than 8 levels, for all states and for the zoom-in alone;
* per class (grass, road, kerb, car; nearest default colour): share of pixels where the two
  class masks agree, and the masks' intersection over union;
* if ``--data-dir`` holds a trained V (``vae.model`` picks which): the distance between the
  encoder means of the two frames, in units of the latent spread (the std of each latent
  dimension over the stock frames, which V never trained on), beside the same distance
  between consecutive stock frames (how far one step of driving moves the latent).

Writes ``<out>/parity.json`` and ``<out>/frames.png`` (stock, fast and the difference map of
a few states: the zoom-in, driving, off the road, and the worst frame).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

import config
from worldmodels import artifacts, fast_render, storage
from worldmodels.env import BrownianPolicy, episode_seed, make_env, preprocess

PARITY_SEED_BASE = 17_000  # episode_seed(17000, i): a track stream no stage trains on
ZOOM_IN_STEPS = 50  # CarRacing zooms in during its first second (50 steps)


def collect(seeds: int, steps: int) -> dict[str, np.ndarray]:
    """Stock and fast frames uint8 (N, 64, 64, 3) of every state, with its track and step (N,)."""
    env = make_env(steps)
    fast, stock, track, step = [], [], [], []
    for i in range(seeds):
        seed = episode_seed(PARITY_SEED_BASE, i)
        obs, _ = env.reset(seed=seed)
        policy = BrownianPolicy(np.random.default_rng(seed))
        for t in range(steps):
            stock.append(preprocess(obs))
            fast.append(fast_render.render_observation(env.unwrapped))
            track.append(i)
            step.append(t)
            obs, _, terminated, truncated, _ = env.step(policy())
            if terminated or truncated:
                break
    env.close()
    return {"fast": np.stack(fast), "stock": np.stack(stock), "track": np.array(track), "step": np.array(step)}


def latent_parity(vision, states: dict[str, np.ndarray]) -> dict:
    """V's encoder means of the fast and stock frames, compared in units of the latent spread."""
    mu_stock, _ = vision.encode(states["stock"])
    mu_fast, _ = vision.encode(states["fast"])
    spread = mu_stock.std(axis=0)
    spread = np.where(spread > 0, spread, 1.0)  # a dead latent dimension: compare it unscaled
    # Consecutive stock frames of the same track: how far one step of driving moves the latent.
    same_track = states["track"][1:] == states["track"][:-1]

    def distance(a, b):
        scaled = (a - b) / spread
        return {"rms_over_dims": float(np.sqrt((scaled ** 2).mean(axis=1)).mean()),
                "mean_abs_per_dim": float(np.abs(scaled).mean())}

    return {"z_size": int(mu_stock.shape[1]), "fast_vs_stock": distance(mu_fast, mu_stock),
            "one_step_of_driving": distance(mu_stock[1:][same_track], mu_stock[:-1][same_track]),
            "units": "encoder-mean difference divided by each dimension's std over the stock frames"}


def figure(states: dict[str, np.ndarray], out: Path) -> Path:
    """Stock, fast and |difference| of four states side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from worldmodels.figures import _save

    fast, stock, step = states["fast"], states["stock"], states["step"]
    per_frame = np.abs(fast.astype(np.int16) - stock).mean(axis=(1, 2, 3))
    road = (fast_render.classify(stock) == fast_render.CLASSES.index("road")).mean(axis=(1, 2))
    driving = step >= ZOOM_IN_STEPS
    picks = {
        "zoom-in (step 10)": int(np.flatnonzero(step == 10)[0]),
        "on the road": int(np.flatnonzero(driving)[np.argmax(road[driving])]),
        "off the road": int(np.flatnonzero(driving)[np.argmin(road[driving])]),
        "worst frame": int(np.argmax(per_frame)),
    }
    fig, axes = plt.subplots(3, len(picks), figsize=(2.3 * len(picks), 7.2))
    for column, (title, index) in enumerate(picks.items()):
        difference = np.abs(fast[index].astype(np.int16) - stock[index]).max(axis=-1)
        axes[0, column].imshow(stock[index])
        axes[0, column].set_title(f"{title}\nstock", fontsize=9)
        axes[1, column].imshow(fast[index])
        axes[1, column].set_title("fast", fontsize=9)
        axes[2, column].imshow(difference, cmap="magma", vmin=0, vmax=32)
        axes[2, column].set_title(f"|difference| 0-32 levels\n(mean {per_frame[index]:.2f})", fontsize=9)
        for row in range(3):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
    path = _save(fig, out, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=6, help="tracks (default 6)")
    parser.add_argument("--steps", type=int, default=300, help="steps per track, zoom-in included (default 300)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "fast_observation",
                        help="folder of parity.json and frames.png (default results/fast_observation)")
    cfg, args = config.parse_args(__doc__, argv, parser)
    if args.seeds < 1 or args.steps <= ZOOM_IN_STEPS:
        parser.error(f"--seeds must be >= 1 and --steps > {ZOOM_IN_STEPS}")

    states = collect(args.seeds, args.steps)
    zoom_in = states["step"] < ZOOM_IN_STEPS
    result = {
        "command": " ".join(["python", "benchmarks/parity_fast_obs.py", *(sys.argv[1:] if argv is None else argv)]),
        "tracks": args.seeds, "steps_per_track": args.steps, "downscale": fast_render.DOWNSCALE,
        "all": fast_render.parity(states["fast"], states["stock"]),
        "zoom_in": fast_render.parity(states["fast"][zoom_in], states["stock"][zoom_in]),
    }
    vision_path = artifacts.vision_path(args.data_dir, cfg)
    if vision_path.exists():
        result["vision"] = {"model": cfg.vae.model, "path": str(vision_path),
                            **latent_parity(artifacts.load_vision(args.data_dir, cfg), states)}
    else:
        result["vision"] = f"not measured: no trained V at {vision_path}"

    args.out.mkdir(parents=True, exist_ok=True)
    storage.atomic_write_json(args.out / "parity.json", result)
    figure(states, args.out / "frames.png")

    every, zoom = result["all"], result["zoom_in"]
    print(f"{every['frames']} states of {args.seeds} tracks ({zoom['frames']} in the zoom-in), |fast - stock| in levels:")
    for name, row in (("all states", every), ("zoom-in only", zoom)):
        print(f"  {name:<13} mean {row['mean']:.3f}  p99 {row['p99']:.0f}  max {row['max']}  pixels differing "
              f"{100 * row['share_differing']:.1f}%  by > 8 levels {100 * row['share_above_8']:.2f}%")
    for name, row in every["classes"].items():
        print(f"  {name:<6} masks agree on {100 * row['agreement']:.2f}% of pixels, IoU {row['iou']:.3f} "
              f"({100 * row['share_of_pixels']:.2f}% of stock pixels)")
    if isinstance(result["vision"], dict):
        v = result["vision"]
        print(f"  V ({v['model']}) encoder means, in latent spreads: fast vs stock {v['fast_vs_stock']['rms_over_dims']:.4f} "
              f"(RMS over dims), one step of driving {v['one_step_of_driving']['rms_over_dims']:.4f}")
    else:
        print(f"  V: {result['vision']}")
    print(f"-> {args.out / 'parity.json'}, {args.out / 'frames.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
