"""Held-out metrics of V, M and C, in one place for the stages, ``vae_gan.compare``, figures and notebooks.

* V: :class:`VisionTotals` accumulates reconstruction MSE, PSNR, KL per dimension and active
  dimensions over batches (exact frame-weighted means); :func:`vision_metrics` streams a V
  over every frame of some episodes with it (stage 2's ``metrics.json``), and
  ``vae_gan.compare`` feeds it the batches it scores for its own sharper metrics too.
  :func:`grid_frames` picks the frames every reconstruction grid shows.
  :func:`vision_by_policy` scores V per policy tag on episodes it did not train on: does V see a
  driver's frames as well as a random policy's?

      python -m worldmodels.metrics vision --data-dir D --model vae_gan D/rollouts other/rollouts --out v.json
* M: :func:`rnn_baselines` fits the two baselines of ``models.mdn_rnn.baseline_nlls`` on the
  training series and scores them on the evaluated ones; :func:`informative_comparison`
  compares M with them on the latent dimensions V uses (stage 4's ``metrics.json``);
  :func:`train_action_mean` is the constant baseline of M's optional action head.
* C: :func:`score_summary` is the mean, standard deviation, minimum and maximum of a
  controller's returns on held-out tracks (``rollout.evaluate``, so every controller ``metrics.json``);
  :func:`paired_comparison` compares two conditions on the same tracks, e.g. stock vs fast frames:

      python -m worldmodels.metrics paired stock.json fast.json --out parity_score.json

  (two outputs of ``evaluate_controller.py`` on the same tracks; tracks that differ are refused).
* The data: ``driving`` replays recorded episodes in the physics, per policy tag
  (``worldmodels.driving.profile_rollouts``): how fast the car went, how often it left the road
  (and fast), the laps it finished and the episodes that left the playfield:

      python -m worldmodels.metrics driving D/rollouts --per-policy 40 --out driving.json

Only numpy is imported at module level; models are imported where used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from worldmodels import sequences, storage

# Frames shown by a reconstruction grid (TensorBoard, README's figure, the comparison's figure).
GRID_FRAMES = 8

# The baselines are fitted on at most this many training episodes (evenly spread): per-dimension
# means and variances are exact to a fraction of a percent long before, and memory stays bounded.
# The evaluated episodes are scored in chunks of this many.
BASELINE_EPISODES = 200

# A latent dimension is "informative" when V's posterior differs from the prior by more than this
# on average (KL in nats, on the training series). With the free-bits floor V puts its
# information in a few dimensions; on the others mu is nearly constant while the posterior is
# nearly the prior, which hands a baseline fitted on mu an easy win that says nothing about M.
INFORMATIVE_KL = 0.5


# --------------------------------------------------------------------------- V


def grid_frames(paths: Path | Sequence[Path], count: int = GRID_FRAMES) -> np.ndarray:
    """``count`` frames spread evenly over one episode (the first of ``paths``), uint8 (count, 64, 64, 3)."""
    path = paths if isinstance(paths, (str, Path)) else paths[0]
    obs = storage.load_episode(path, keys=("obs",))["obs"]
    return obs[np.linspace(0, len(obs) - 1, min(count, len(obs))).astype(int)]


class VisionTotals:
    """V's metrics over a stream of batches: feed :meth:`add`, read :meth:`result`.

    Memory: the posterior means mu (N, Z) of every frame (for the active dimensions), nothing else.
    """

    def __init__(self):
        self.frames, self.mse, self.psnr, self.kl, self.mus = 0, 0.0, 0.0, 0.0, []

    def add(self, originals, reconstructions, mu, logvar) -> None:
        """One batch: uint8 ``originals`` (B, 64, 64, 3), ``reconstructions`` in [0, 1], mu and logvar (B, Z)."""
        from models import vae as vae_lib

        n = len(originals)
        pixel = vae_lib.reconstruction_metrics(originals, reconstructions)
        # Both helpers average over frames, so frame-weighted means of the batches are exact.
        self.mse += pixel["mse"] * n
        self.psnr += pixel["psnr"] * n
        self.kl = self.kl + vae_lib.kl_per_dimension(mu, logvar) * n
        self.mus.append(mu)
        self.frames += n

    def result(self) -> dict:
        """``reconstruction_mse``, ``psnr_db`` (posterior-mean reconstructions), ``kl_per_frame`` and
        ``kl_per_dimension`` (nats), ``active_dimensions`` (``models.vae`` helpers)."""
        from models import vae as vae_lib

        if self.frames == 0:
            raise storage.MissingDataError("the evaluated episodes hold no frames")
        kl = self.kl / self.frames
        return {
            "reconstruction_mse": self.mse / self.frames,
            "psnr_db": self.psnr / self.frames,
            "kl_per_frame": float(kl.sum()),
            "kl_per_dimension": [float(k) for k in kl],
            "active_dimensions": vae_lib.active_dimensions(np.concatenate(self.mus)),
        }


def vision_metrics(model, paths, batch_size: int) -> dict:
    """V's metrics (:meth:`VisionTotals.result`) on every frame of ``paths``, streamed in batches.

    ``model`` has ``encoder`` and ``decoder`` (ConvVAE or VAE-GAN); memory: a batch, plus mu (N, Z).
    """
    from models import vae as vae_lib
    from worldmodels import datasets

    totals = VisionTotals()
    for batch in datasets.frame_dataset(paths, batch_size, shuffle=False):
        batch = batch.numpy()
        mu, logvar = model.encoder(vae_lib.to_float_frames(batch), training=False)
        reconstruction = model.decoder(mu, training=False).numpy()
        totals.add(batch, reconstruction, mu.numpy(), logvar.numpy())
    return totals.result()


def vision_by_policy(model, folders: Sequence[Path], exclude=(), per_policy: int = 20, batch_size: int = 256) -> dict:
    """V's metrics (:func:`vision_metrics`) on the episodes of ``folders``, grouped by the policy that drove them.

    Does V see the frames a driver meets as well as a random policy's? Episodes whose resolved path is in
    ``exclude`` (V's own training episodes) are skipped; of each policy tag (the episode's ``policy``,
    ``"brownian"`` for files written before tags existed) the first ``per_policy`` in sorted order count.
    Returns ``{tag: {"episodes", "frames", "files", **metrics}}`` with tags sorted; ``kl_per_dimension``
    is left out. Memory: one batch of frames and the mu (N, Z) of one tag's frames.
    """
    from worldmodels import datasets

    chosen = storage.episodes_by_policy(folders, per_policy, exclude)
    if not any(chosen.values()):
        raise storage.MissingDataError(f"{', '.join(map(str, folders))}: every episode is one V trained on; "
                                       "give episodes V has not seen")
    result = {}
    for tag in sorted(chosen):
        paths = chosen[tag]
        found = vision_metrics(model, paths, batch_size)
        found.pop("kl_per_dimension")
        result[tag] = {"episodes": len(paths), "frames": datasets.count_frames(paths), "files": [str(p) for p in paths],
                       **found}
    return result


# --------------------------------------------------------------------------- M


def baseline_fit_paths(train_paths) -> list:
    """The training episodes M's baselines are fitted on: at most BASELINE_EPISODES, evenly spread."""
    picks = np.unique(np.linspace(0, len(train_paths) - 1, min(BASELINE_EPISODES, len(train_paths))).astype(int))
    return [train_paths[i] for i in picks]


def rnn_baselines(train_paths, eval_paths, seed: int) -> dict:
    """``models.mdn_rnn.baseline_nlls`` on ``eval_paths`` for z = mu and for sampled z, and a reward baseline.

    ``{"mu": {"persistence", "unconditional"}, "sampled": {...}, "mu_per_dimension": {...},
    "sampled_per_dimension": {...}, "kl_per_dimension", "reward_mse_of_train_mean",
    "fitted_on_episodes"}``. Sampled z use the noise of ``sequences.latent_noise(seed, name)``,
    the same draws as ``sequences.evaluate_model(..., sample_seed=seed)``. Fitted on at most
    BASELINE_EPISODES training episodes; the evaluated episodes are scored in chunks whose
    means are weighted by their number of transitions (exactly the mean over all of them).
    ``kl_per_dimension`` is V's mean KL per latent dimension on the fitted training episodes.
    """
    from models.mdn_rnn import baseline_nlls
    from models.vae import kl_per_dimension

    keys = ("mu", "logvar", "reward")
    fit_paths = baseline_fit_paths(train_paths)
    fit = [storage.load_episode(p, "series", keys=keys) for p in fit_paths]
    train_z = {"mu": [f["mu"] for f in fit],
               "sampled": [sequences.sampled_latents(f, seed, p.name) for f, p in zip(fit, fit_paths)]}
    kl = kl_per_dimension(np.concatenate([f["mu"] for f in fit]), np.concatenate([f["logvar"] for f in fit]))
    reward_mean = float(np.mean(np.concatenate([f["reward"] for f in fit])))
    totals = {kind: {"persistence": 0.0, "unconditional": 0.0} for kind in train_z}
    transitions, reward_error, steps = 0, 0.0, 0
    for start in range(0, len(eval_paths), BASELINE_EPISODES):
        chunk_paths = eval_paths[start:start + BASELINE_EPISODES]
        chunk = [storage.load_episode(p, "series", keys=keys) for p in chunk_paths]
        reward = np.concatenate([c["reward"] for c in chunk]).astype(np.float64)
        reward_error += float(np.sum(np.square(reward - reward_mean)))
        steps += len(reward)
        count = sum(len(c["mu"]) - 1 for c in chunk)
        if not count:
            continue
        eval_z = {"mu": [c["mu"] for c in chunk],
                  "sampled": [sequences.sampled_latents(c, seed, p.name) for c, p in zip(chunk, chunk_paths)]}
        for kind in totals:
            for name, value in baseline_nlls(train_z[kind], eval_z[kind], per_dimension=True).items():
                totals[kind][name] = totals[kind][name] + value * count
        transitions += count
    per_dimension = {kind: {name: total / transitions for name, total in values.items()}
                     for kind, values in totals.items()}
    return {
        **{kind: {name: float(np.mean(v)) for name, v in values.items()} for kind, values in per_dimension.items()},
        **{f"{kind}_per_dimension": {name: [float(x) for x in v] for name, v in values.items()}
           for kind, values in per_dimension.items()},
        "kl_per_dimension": [float(x) for x in kl],
        "fitted_on_episodes": len(fit_paths),
        "reward_mse_of_train_mean": reward_error / steps,
    }


def train_action_mean(train_paths) -> np.ndarray:
    """float64 (A,): the mean recorded action over the action head's targets a_1..a_{T-1} of the training series.

    The constant prediction of the action head's "train mean" baseline (``sequences.evaluate_model``),
    fitted on at most BASELINE_EPISODES evenly spread training episodes, as :func:`rnn_baselines`.
    """
    actions = np.concatenate([storage.load_episode(p, "series", keys=("action",))["action"][1:]
                              for p in baseline_fit_paths(train_paths)])
    if not len(actions):
        raise ValueError("the training episodes have no transition: every episode has a single frame")
    return actions.astype(np.float64).mean(axis=0)


def informative_comparison(z_nll_per_dimension, base: dict) -> dict:
    """M and the z = mu baselines on the informative latent dimensions only (see INFORMATIVE_KL)."""
    dims = [i for i, k in enumerate(base["kl_per_dimension"]) if k > INFORMATIVE_KL]
    if not dims:
        return {"informative_dimensions": [], "z_nll_informative": None, "baselines_informative": None,
                "beats_baselines_informative": None}
    ours = float(np.mean([z_nll_per_dimension[i] for i in dims]))
    theirs = {name: float(np.mean([values[i] for i in dims])) for name, values in base["mu_per_dimension"].items()}
    return {"informative_dimensions": dims, "z_nll_informative": ours, "baselines_informative": theirs,
            "beats_baselines_informative": bool(ours < min(theirs.values()))}


# --------------------------------------------------------------------------- C


def score_summary(scores) -> dict:
    """``{"mean", "std", "min", "max"}`` of a controller's returns ``scores`` (E,) on held-out tracks (population std)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must have shape (E,) with E >= 1, got {scores.shape}")
    return {"mean": float(scores.mean()), "std": float(scores.std()),
            "min": float(scores.min()), "max": float(scores.max())}


BOOTSTRAP_RESAMPLES = 10_000  # resamples of the IQM's bootstrap interval

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


def paired_comparison(scores_a, scores_b, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Two conditions on the same tracks: per-track returns ``scores_a`` and ``scores_b`` (E,), track i in both.

    Returns each side's :func:`summarise` and the per-track difference b - a: its mean, standard error,
    95% percentile-bootstrap interval of the mean (tracks resampled with replacement from a fixed
    ``seed``), the largest |difference| and how many tracks differ at all. Pairing removes the
    track-to-track spread (a car finishes one track and leaves another) that dominates either mean's
    standard error, so it answers "did the condition change the score" far more sharply.
    """
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores need two equal-length 1-D lists of one score per track, got {a.shape} and {b.shape}")
    diff = b - a
    n = len(diff)
    means = diff[np.random.default_rng(seed).integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"a": summarise(a, resamples, seed), "b": summarise(b, resamples, seed), "tracks": n,
            "difference": {"mean": float(diff.mean()), "sem": float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
                           "ci95": [float(low), float(high)], "max_abs": float(np.abs(diff).max()),
                           "tracks_differing": int(np.count_nonzero(diff))}}


PAIRED_KEYS = ("track_seed", "episodes", "max_steps")  # what makes two evaluations' tracks the same
CONDITION_KEYS = ("observation", "z_input", "agent", "controller", "dtype", "command")


def paired_files(path_a, path_b) -> dict:
    """:func:`paired_comparison` of two ``evaluate_controller.py`` outputs, with what each measured.

    Refuses (CorruptFileError, one line) files without per-track ``scores`` or made on other tracks.
    """
    runs = []
    for path in (path_a, path_b):
        data = storage.read_json(path)
        if not isinstance(data.get("scores"), list) or any(key not in data for key in PAIRED_KEYS):
            raise storage.CorruptFileError(f"{path} is not an output of evaluate_controller.py (needs scores and "
                                           f"{', '.join(PAIRED_KEYS)})")
        runs.append(data)
    a, b = runs
    differ = [key for key in PAIRED_KEYS if a[key] != b[key]]
    if differ:
        raise storage.CorruptFileError(f"{path_a} and {path_b} were scored on other tracks ({', '.join(f'{k}: {a[k]} vs {b[k]}' for k in differ)}); "
                                       f"rerun one with the other's --track-seed and --episodes")
    result = paired_comparison(a["scores"], b["scores"])
    result.update({key: a[key] for key in PAIRED_KEYS})
    for side, data, path in (("a", a, path_a), ("b", b, path_b)):
        result[side].update(file=str(path), **{key: data[key] for key in CONDITION_KEYS if key in data})
    return result


def vision_main(args) -> int:
    """``python -m worldmodels.metrics vision``: :func:`vision_by_policy` of a data dir's V, printed and saved."""
    import config
    from worldmodels import artifacts

    folder = artifacts.vision_dir(args.data_dir, config.Config(vae=config.VAEConfig(model=args.model)))
    cfg = config.load_config(folder / artifacts.CONFIG_FILE)
    split = config.read_json(folder / artifacts.SPLIT_FILE)
    trained = [Path(args.data_dir) / artifacts.ROLLOUTS / name for name in split["train"]]
    model = artifacts.load_vision(args.data_dir, cfg)
    result = {"data_dir": str(args.data_dir), "model": args.model, "episodes": [str(f) for f in args.episodes],
              "excluded_training_episodes": len(trained),
              "policies": vision_by_policy(model, args.episodes, trained, args.per_policy)}
    if args.out:
        storage.atomic_write_json(args.out, result)
    for tag, row in result["policies"].items():
        print(f"{tag}: {row['episodes']} episodes, {row['frames']} frames: PSNR {row['psnr_db']:.2f} dB, "
              f"MSE {row['reconstruction_mse']:.5f}, KL {row['kl_per_frame']:.2f} nats/frame, "
              f"{row['active_dimensions']} active dimensions")
    return 0


def driving_main(args) -> int:
    """``python -m worldmodels.metrics driving``: :func:`worldmodels.driving.profile_rollouts`, printed and saved."""
    from tqdm import tqdm

    from worldmodels import driving

    found = driving.profile_rollouts(args.episodes, args.per_policy,
                                     progress=lambda jobs: tqdm(jobs, desc="replay", unit="episode"))
    if args.out:
        storage.atomic_write_json(args.out, {"episodes": [str(f) for f in args.episodes],
                                             "fast_speed": driving.FAST_SPEED, "policies": found})
    for tag, row in found.items():
        print(f"{tag}: {row['episodes']} episodes, return {row['return_mean']:.1f} +- {row['return_std']:.1f}; "
              f"mean speed {row['mean_mean_speed']:.1f} units/s; off the road {100 * row['mean_off_road']:.1f}% of "
              f"steps, {100 * row['mean_off_road_fast']:.1f}% at >= {driving.FAST_SPEED:g} units/s; "
              f"{row['mean_excursions']:.1f} excursions onto the grass per episode; {row['laps_finished']} laps "
              f"finished, {row['left_playfield']} left the playfield; tiles {100 * row['mean_tile_share']:.1f}%"
              + (f"; {row['replays_mismatched']} replays MISMATCHED" if row["replays_mismatched"] else ""))
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Compare two evaluate_controller.py outputs made on the same tracks.")
    commands = parser.add_subparsers(dest="command", required=True)
    paired = commands.add_parser("paired", help="per-track difference B - A of two evaluations on the same tracks")
    paired.add_argument("a", type=Path, help="the first evaluation's .json (e.g. stock frames)")
    paired.add_argument("b", type=Path, help="the second evaluation's .json (e.g. fast frames)")
    paired.add_argument("--out", type=Path, help="also write the comparison as JSON")
    vision = commands.add_parser("vision", help="V's reconstruction and KL per policy tag on episodes V did not train on")
    vision.add_argument("--data-dir", type=Path, required=True, help="the data dir whose V is scored")
    vision.add_argument("--model", choices=("vae", "vae_gan"), default="vae", help="which V of the data dir")
    vision.add_argument("episodes", type=Path, nargs="+", help="rollout folders (V's own training episodes are skipped)")
    vision.add_argument("--per-policy", type=int, default=20, help="at most this many episodes of each policy tag")
    vision.add_argument("--out", type=Path, help="also write the result as JSON")
    driving = commands.add_parser("driving", help="how the car drove in recorded episodes, per policy tag (a "
                                  "physics replay: speed, time off the road, laps)")
    driving.add_argument("episodes", type=Path, nargs="+", help="rollout folders (stage 1's, an iteration's)")
    driving.add_argument("--per-policy", type=int, default=40, help="at most this many episodes of each policy tag")
    driving.add_argument("--out", type=Path, help="also write the result as JSON")
    args = parser.parse_args(argv)
    if args.command == "vision":
        return vision_main(args)
    if args.command == "driving":
        return driving_main(args)
    result = paired_files(args.a, args.b)
    if args.out:
        storage.atomic_write_json(args.out, result)
    d = result["difference"]
    for side in ("a", "b"):
        r = result[side]
        print(f"{side}: {r['mean']:.1f} +- {r['std']:.1f} (sem {r['sem']:.1f}, IQM {r['iqm']:.1f})  {r['file']}")
    print(f"b - a over {result['tracks']} tracks: {d['mean']:+.2f} +- {d['sem']:.2f} (sem; 95% bootstrap "
          f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]), {d['tracks_differing']} tracks differ, largest |difference| "
          f"{d['max_abs']:.1f}")
    return 0


if __name__ == "__main__":
    from worldmodels import cli

    cli.run(main)
