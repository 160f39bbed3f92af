"""The seed study as a library: one stage-5 search per CMA-ES seed on one V and M, all scored on the same tracks.

:func:`run_study` is what ``study_seeds.py`` runs (issue #18 item 3: is the VAE-GAN's controller
better than the VAE's, or was one search lucky?). For every seed k of ``controller.seeds`` it runs
stage 5 (:func:`worldmodels.controller_training.train_controller`, exactly what
``05_train_controller.py --set controller.seed=<k>`` runs, in the world ``controller.env`` names)
into ``<data>/controller_seeds/seed_<k>/``, with V and M of the data dir loaded once for all seeds.
A seed sets the CMA-ES stream, the training tracks and the periodic held-out tracks that pick the
controller: that is what differs between seeds.

**The same final tracks for every seed.** Stage 5's own final evaluation scores a controller on the
final-evaluation stream of *its* ``controller.seed`` (``2,000,000 + seed``), which would give each
seed other tracks. The study therefore skips it (``final_eval=False``) and scores every seed's
selected controller (``params``) on the tracks of the *base* config's ``controller.seed`` (default
0): track i = ``episode_seed(2,000,000 + controller.seed, i)``, i < ``controller.final_eval_episodes``
- the tracks of ``<data>/controller/metrics.json`` of a plain stage 5 run with that config - with
:func:`worldmodels.controller_evaluation.score_on_tracks`, the code of ``evaluate_controller.py``,
full episodes on gymnasium's stock pixels. Each seed's score is written as
``seed_<k>/evaluation_s<base>_n<count>.json`` with the per-track ``.csv`` beside it, the very files
``evaluate_controller.py --controller seed_<k>/controller.npz --track-seed <base>`` writes. (A
search excludes from training only the final tracks of its own seed; that a seed k > 0 draws one of
the 100 shared tracks among its random training tracks has a chance of about 1e-4 over a whole
paper-sized search, and is not excluded.)

Writes ``<data>/controller_seeds/``: ``results.json`` (per seed: the 100-track mean, std, IQM with
its bootstrap interval, min, max, the scores; across seeds: the mean and std (ddof 1) of the
per-seed means and of the per-seed IQMs; the final tracks, V's kind and the settings),
``results.md`` (a table) and ``seeds.png`` (``figures.seed_plot``: per-seed score distributions and
the mean over seeds).

Resumable: each seed's search resumes where it stopped, a finished one is skipped, a seed's score
is kept while its controller is unchanged, and the results are rewritten at the end. Adding a seed
to ``controller.seeds`` runs that seed only.

Two V kinds side by side (each data dir holds one V kind's M)::

    python -m worldmodels.seed_study table --run vae=DATA_VAE --run vae_gan=DATA_GAN --out results/seeds.md

reads each run's ``results.json`` and writes one table (with two runs, the difference of their means
over seeds and its standard error; ``--figure F.png`` draws both side by side); runs scored on
different final tracks (or with another step limit) are refused.

TensorFlow is imported when the models are loaded, after the argument checks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import config
from worldmodels import artifacts, storage
from worldmodels.controller_evaluation import evaluation_path, final_tracks_base, score_on_tracks, write_track_csv
from worldmodels.controller_training import DEFAULT_MAX_CONCURRENT, train_controller

RESULTS = "results.json"
# The study's settings recorded in results.json (controller.seed: the base of the shared final tracks).
SETTINGS = ("vae.model", "controller.env", "controller.generations", "controller.population",
            "controller.rollouts_per_member", "controller.eval_every", "controller.eval_episodes",
            "controller.final_eval_episodes", "controller.max_steps", "controller.patience", "controller.racing",
            "controller.z_input", "controller.init_from", "env.observation", "controller.seed", "controller.seeds")


def study_dir(data_dir) -> Path:
    return Path(data_dir) / artifacts.CONTROLLER_SEEDS


def seed_dir(data_dir, seed: int) -> Path:
    """``<data>/controller_seeds/seed_<k>``: the search of controller seed k."""
    return study_dir(data_dir) / f"seed_{int(seed)}"


def study_seeds(cfg: config.Config) -> list[int]:
    """``controller.seeds`` as a list; an empty one is a ConfigError (the config refuses repeats and negatives)."""
    if not cfg.controller.seeds:
        raise config.ConfigError("controller.seeds is empty: name at least one seed, e.g. --set controller.seeds=0,1,2")
    return list(cfg.controller.seeds)


def final_tracks(cfg: config.Config) -> tuple[int, int]:
    """``(base, episodes)`` of the tracks every seed is scored on: the final-evaluation stream of the base
    config's ``controller.seed``, ``controller.final_eval_episodes`` tracks."""
    return final_tracks_base(cfg), cfg.controller.final_eval_episodes


# --------------------------------------------------------------------------- one seed


def score_done(path: Path, generation: int, cfg: config.Config) -> bool:
    """Whether ``path`` already holds the score of the controller of ``generation`` on the study's tracks."""
    try:
        old = storage.read_json(path)
    except (storage.MissingDataError, storage.CorruptFileError):
        return False
    base, episodes = final_tracks(cfg)
    want = (generation, episodes, base, cfg.controller.max_steps, "stock")
    return (old.get("generation"), old.get("episodes"), old.get("track_seed"), old.get("max_steps"),
            old.get("observation")) == want


def score_seed(cfg: config.Config, run_cfg: config.Config, out: Path, data_dir, models, *, max_concurrent: int,
               command: str, prefix: str) -> tuple[dict, object]:
    """Score the selected controller of ``out`` on the study's tracks (kept if already scored).

    Returns ``(the evaluation's dict, (V, M) or None)``, the models loaded here if they were needed.
    """
    base, episodes = final_tracks(cfg)
    path = evaluation_path(out, base, episodes)
    params, info = artifacts.load_controller(out / artifacts.CONTROLLER_FILE, "params", cfg.vae.z_size,
                                             cfg.rnn.hidden_units)
    generation = int(info["generation"])
    if score_done(path, generation, cfg):
        print(f"{prefix} already scored on the {episodes} shared tracks: {path}")
        return storage.read_json(path), models
    if models is None:
        from worldmodels import rollout

        models = rollout.load_world_models(data_dir, cfg)
    stock = config.apply_overrides(run_cfg, {"env.observation": "stock"})  # scores are about the stock pixels
    metrics = score_on_tracks(stock, *models, params, base, episodes, max_concurrent)
    selected = int(info.get("best_eval_generation", -1))
    metrics.update(agent=f"{out / artifacts.CONTROLLER_FILE} (params)", which="params", generation=generation,
                   selected_at_generation=selected if selected >= 0 else generation,
                   controller_seed=run_cfg.controller.seed, command=command)
    write_track_csv(path.with_suffix(".csv"), metrics)
    storage.atomic_write_json(path, metrics)  # last: the JSON marks the score done (score_done)
    print(f"{prefix} {metrics['mean']:.1f} +- {metrics['std']:.1f} (IQM {metrics['iqm']:.1f}) on the {episodes} "
          f"shared tracks -> {path}")
    return metrics, models


def seed_row(seed: int, out: Path, metrics: dict) -> dict:
    """One seed's line of results.json: its score on the shared tracks and where it lives."""
    return {"seed": seed, "mean": metrics["mean"], "std": metrics["std"], "iqm": metrics["iqm"],
            "iqm_ci95": metrics["iqm_ci95"], "min": metrics["min"], "max": metrics["max"],
            "generation": metrics["generation"], "selected_at_generation": metrics["selected_at_generation"],
            "scores": metrics["scores"], "folder": str(out)}


def _mean_std(values) -> tuple[float, float | None]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def across_seeds(rows: list[dict]) -> dict:
    """Mean and standard deviation (ddof 1; None for one seed) over seeds of the per-seed means and IQMs."""
    mean, std = _mean_std([r["mean"] for r in rows])
    iqm_mean, iqm_std = _mean_std([r["iqm"] for r in rows])
    return {"seeds": len(rows), "mean": mean, "std": std, "iqm_mean": iqm_mean, "iqm_std": iqm_std}


# --------------------------------------------------------------------------- the study


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def markdown_table(results: dict) -> str:
    """results.md: one row per seed and the row over seeds."""
    s, tracks, across = results["settings"], results["final_tracks"], results["across_seeds"]
    lines = [
        f"# Controller seeds on one V ({results['vae_model']}) and its M",
        "",
        f"Preset `{results['preset']}`, C trained in the {s['controller.env']} environment, {s['controller.generations']} "
        f"generations of {s['controller.population']} members x {s['controller.rollouts_per_member']} episode(s), "
        f"one search per CMA-ES seed; every selected controller is scored on the same {tracks['episodes']} held-out "
        f"real tracks (`episode_seed({tracks['track_seed']}, i)`, <= {tracks['max_steps']} steps).",
        "",
        "| controller seed | mean ± std over the tracks | IQM [95% bootstrap] | min | max | selected at generation |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['seed']} | {_pm(r['mean'], r['std'])} | {r['iqm']:.1f} [{r['iqm_ci95'][0]:.1f}, "
              f"{r['iqm_ci95'][1]:.1f}] | {r['min']:.1f} | {r['max']:.1f} | {r['selected_at_generation']} of "
              f"{r['generation']} |" for r in results["rows"]]
    lines += [f"| **over {across['seeds']} seeds** (mean ± std of the seed means, ddof 1) | "
              f"**{_pm(across['mean'], across['std'])}** | {_pm(across['iqm_mean'], across['iqm_std'])} | | | |", ""]
    return "\n".join(lines)


def run_study(cfg: config.Config, data_dir, *, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
              command: str = "") -> dict:
    """Train (or resume) one controller per seed of ``controller.seeds``, score each on the shared tracks, and
    write the study. Returns the content of ``results.json``; an empty ``controller.seeds`` is a ConfigError."""
    seeds = study_seeds(cfg)
    models, rows, tracks = None, [], []
    for seed in seeds:
        run_cfg = config.apply_overrides(cfg, {"controller.seed": seed})
        out, prefix = seed_dir(data_dir, seed), f"[seeds k={seed}]"
        print(f"{prefix} -> {out}", flush=True)
        result = train_controller(run_cfg, data_dir, max_concurrent=max_concurrent, final_eval=False, command=command,
                                  models=models, prefix=prefix, out=out)
        models = result["models"] or models  # load V and M once for the whole study
        metrics, models = score_seed(cfg, run_cfg, out, data_dir, models, max_concurrent=max_concurrent,
                                     command=command, prefix=prefix)
        rows.append(seed_row(seed, out, metrics))
        tracks.append(list(metrics["seeds"]))
    if any(t != tracks[0] for t in tracks):  # score_seed scores every seed on final_tracks(cfg)
        raise RuntimeError(f"the seeds were scored on different tracks: {tracks}")
    return write_results(cfg, data_dir, rows, tracks[0], command)


def write_results(cfg: config.Config, data_dir, rows: list[dict], track_seeds: list[int], command: str) -> dict:
    """Write results.json, results.md and seeds.png of the study from its ``rows`` (:func:`seed_row`)."""
    from worldmodels import figures

    base, episodes = final_tracks(cfg)
    results = {"vae_model": cfg.vae.model, "preset": cfg.preset, "command": command, "rows": rows,
               "across_seeds": across_seeds(rows),
               "final_tracks": {"track_seed": base, "episodes": episodes, "max_steps": cfg.controller.max_steps,
                                "seeds": track_seeds},
               "settings": {key: config.get(cfg, key) for key in SETTINGS}}
    study = study_dir(data_dir)
    storage.atomic_write_json(study / RESULTS, results)
    storage.atomic_write_text(study / "results.md", markdown_table(results))
    figures.seed_plot(study / "seeds.png", rows, results["across_seeds"],
                      f"C on {cfg.vae.model}: {len(rows)} CMA-ES seeds, the same {episodes} held-out tracks")
    print(markdown_table(results))
    print(f"[seeds] -> {study / RESULTS}, results.md, seeds.png")
    return results


# --------------------------------------------------------------------------- two V kinds side by side


def read_results(where: Path) -> dict:
    """The ``results.json`` of a seed study, given its data dir or its ``controller_seeds`` folder."""
    where = Path(where)
    path = where / RESULTS if (where / RESULTS).is_file() else study_dir(where) / RESULTS
    results = storage.read_json(path)  # missing: MissingDataError naming the file
    keys = ("rows", "across_seeds", "final_tracks", "vae_model", "settings")
    if not all(key in results for key in keys) or not results["rows"]:
        raise storage.CorruptFileError(f"{path} is not a seed study's results (rerun study_seeds.py)")
    return results


def check_same_tracks(runs: dict[str, dict]) -> None:
    """Refuse runs scored on other final tracks or with another step limit than the first (ConfigError)."""
    (first, reference), *others = runs.items()
    want = reference["final_tracks"]
    for name, results in others:
        got = results["final_tracks"]
        if (got["seeds"], got["max_steps"]) != (want["seeds"], want["max_steps"]):
            raise config.ConfigError(
                f"runs {first!r} and {name!r} were scored on different final tracks ({want['episodes']} tracks "
                f"episode_seed({want['track_seed']}, i) of <= {want['max_steps']} steps vs {got['episodes']} "
                f"episode_seed({got['track_seed']}, i) of <= {got['max_steps']}); their scores are not comparable")


def comparison_table(runs: dict[str, dict]) -> str:
    """One markdown table of several seed studies (e.g. one per V kind), after :func:`check_same_tracks`."""
    check_same_tracks(runs)
    tracks = next(iter(runs.values()))["final_tracks"]
    lines = [f"Each controller scored on the same {tracks['episodes']} held-out real tracks "
             f"(`episode_seed({tracks['track_seed']}, i)`, <= {tracks['max_steps']} steps); over seeds: mean ± std "
             "(ddof 1) of the per-seed means.", "",
             "| run | V | seeds | per-seed means | mean ± std over seeds | IQM over seeds | generations x population |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, results in runs.items():
        rows, across, s = results["rows"], results["across_seeds"], results["settings"]
        lines.append(f"| {name} | {results['vae_model']} | {', '.join(str(r['seed']) for r in rows)} | "
                     f"{', '.join(format(r['mean'], '.1f') for r in rows)} | {_pm(across['mean'], across['std'])} | "
                     f"{_pm(across['iqm_mean'], across['iqm_std'])} | {s['controller.generations']} x "
                     f"{s['controller.population']} |")
    if len(runs) == 2:
        (a, first), (b, second) = runs.items()
        lines += ["", difference_line(a, first["across_seeds"], b, second["across_seeds"])]
    return "\n".join(lines) + "\n"


def difference_line(a: str, first: dict, b: str, second: dict) -> str:
    """The difference of two runs' means over seeds with its standard error (Welch: each run's std of
    the seed means over sqrt(seeds)); one seed in either run gives no error."""
    diff = second["mean"] - first["mean"]
    if first.get("std") is None or second.get("std") is None:
        return f"{b} − {a}: {diff:+.1f} (one seed in a run: no standard error)."
    se = float(np.sqrt(first["std"] ** 2 / first["seeds"] + second["std"] ** 2 / second["seeds"]))
    if se == 0:
        return f"{b} − {a}: {diff:+.1f} (no spread over seeds)."
    return f"{b} − {a}: {diff:+.1f} ± {se:.1f} (standard error over the seeds, Welch), {abs(diff) / se:.1f} standard errors."


def parse_runs(items: list[str]) -> dict[str, Path]:
    """``["vae=D1", "vae_gan=D2"]`` -> ``{"vae": Path("D1"), ...}``; a malformed or repeated name is a ConfigError."""
    runs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise config.ConfigError(f"--run takes NAME=DATA_DIR, got {item!r}")
        if name in runs:
            raise config.ConfigError(f"--run names {name!r} twice")
        runs[name] = Path(path)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    table = commands.add_parser("table", help="one table of several seed studies (e.g. one per V kind)")
    table.add_argument("--run", action="append", required=True, metavar="NAME=DATA_DIR",
                       help="a seed study: its data dir (or its controller_seeds folder); give two or more")
    table.add_argument("--out", type=Path, help="also write the table to this markdown file")
    table.add_argument("--figure", type=Path, help="also draw the runs' per-seed scores side by side (.png)")
    args = parser.parse_args(argv)
    runs = {name: read_results(path) for name, path in parse_runs(args.run).items()}
    text = comparison_table(runs)
    if args.out:
        storage.atomic_write_text(args.out, text)
    if args.figure:
        from worldmodels import figures

        figures.seed_comparison_plot(args.figure, runs)
    print(text, end="")
    return 0


if __name__ == "__main__":
    from worldmodels import cli

    cli.run(main)
