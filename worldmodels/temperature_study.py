"""The temperature study as a library: train C in M's dream at each tau, score each in the real CarRacing.

:func:`run_study` is what ``study_temperature.py`` runs. For every tau in ``dream.temperatures``
it runs stage 5 in the dream (:func:`worldmodels.controller_training.train_controller` with
``controller.env=dream``, exactly what ``05_train_controller.py --env dream --set
dream.temperature=<tau>`` runs) into ``<data>/controller_dream_t<tau>/``. Each controller is
selected by its dream score and finally scored on the same ``controller.final_eval_episodes``
held-out real tracks (and on as many held-out dream episodes at its own tau). The paper's Doom
table (REFERENCE.md) showed that at a low tau the controller exploits M: a high dream score and
a poor real one.

Writes ``<data>/temperature_study/``: ``results.md`` (a table like the paper's: tau, score in
the dream, score in the real environment, mean +- std), ``results.json`` (the same numbers with
the settings and folders) and ``temperature.png`` (``figures.temperature_plot``: both scores per
tau with error bars). If ``<data>/controller/metrics.json`` (the controller trained in the real
environment) was scored on the same held-out tracks, it is a row of the table and a line in the plot.

Resumable: each tau's search resumes where it stopped, finished ones are skipped, and the
results are rewritten from the ``metrics.json`` files at the end.

TensorFlow is imported when the models are loaded, after the argument checks (and not in the
spawned environment workers).
"""

from __future__ import annotations

from pathlib import Path

import config
from worldmodels import artifacts, storage
from worldmodels.controller_training import DEFAULT_MAX_CONCURRENT, output_dir, train_controller

PAPER_DOOM = "Ha & Schmidhuber 2018, Doom take cover (REFERENCE.md): at tau 0.1 and 0.5 the dream score is ~2000 " \
             "and the real one ~200; at tau 1.15 the real score is best (1092 +- 556)."
# The study's settings recorded in results.json beside its rows.
SETTINGS = ("controller.generations", "controller.population", "controller.rollouts_per_member",
            "controller.final_eval_episodes", "controller.max_steps", "controller.seed", "dream.max_steps",
            "dream.skip_initial_frames")


def study_dir(data_dir) -> Path:
    return Path(data_dir) / artifacts.TEMPERATURE_STUDY


def row_for(tau: float, out: Path, metrics: dict) -> dict:
    dream = metrics["dream"]
    return {"temperature": tau, "dream_mean": dream["mean"], "dream_std": dream["std"],
            "real_mean": metrics["mean"], "real_std": metrics["std"], "real_episodes": metrics["episodes"],
            "dream_episodes": dream["episodes"], "generation": metrics["generation"],
            "selected_at_generation": metrics["selected_at_generation"], "folder": str(out)}


def real_trained_row(data_dir: Path, seeds: list, max_steps: int) -> tuple[dict | None, str]:
    """The controller trained in the real environment (``<data_dir>/controller/metrics.json``), as a
    comparison row, if it was scored on the same held-out tracks (``seeds``) with the same step
    limit as the dream-trained ones; else None. Returns (row or None, a one-line reason)."""
    path = Path(data_dir) / artifacts.CONTROLLER / artifacts.METRICS_FILE
    if not path.exists():
        return None, f"no real-trained controller to compare with ({path} is missing: run 05_train_controller.py)"
    metrics = storage.read_json(path)
    if metrics.get("seeds") != list(seeds) or metrics.get("max_steps") != max_steps:
        return None, (f"{path} was scored on other tracks or another step limit than the study; "
                      "not compared (rerun evaluate_controller.py --replace-metrics with this config)")
    return {"real_mean": metrics["mean"], "real_std": metrics["std"], "real_episodes": len(metrics["seeds"]),
            "generation": metrics.get("generation"), "folder": str(path.parent)}, f"compared with {path}"


def markdown_table(rows: list[dict], cfg: config.Config, real: dict | None = None) -> str:
    lines = [
        "# Temperature study: C trained in M's dream, scored in the dream and in the real CarRacing-v3",
        "",
        f"Preset `{cfg.preset}`, {cfg.controller.generations} generations of {cfg.controller.population} members x "
        f"{cfg.controller.rollouts_per_member} dream episode(s) of <= {cfg.dream.max_steps} steps; each controller "
        f"is scored on {rows[0]['real_episodes'] if rows else '?'} held-out real tracks (the same for every tau) "
        "and on as many held-out dream episodes at its own tau (mean +- std).",
        "",
        "| tau | score in dream | score in real env |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r['temperature']:g} | {r['dream_mean']:.1f} +- {r['dream_std']:.1f} | "
              f"{r['real_mean']:.1f} +- {r['real_std']:.1f} |" for r in rows]
    if real is not None:
        lines.append(f"| trained in the real env (`05_train_controller.py`) | - | "
                     f"{real['real_mean']:.1f} +- {real['real_std']:.1f} |")
    lines += ["", f"For comparison, {PAPER_DOOM}", ""]
    return "\n".join(lines)


def run_study(cfg: config.Config, data_dir, *, max_concurrent: int = DEFAULT_MAX_CONCURRENT,
              command: str = "") -> dict:
    """Train (or resume) one dream controller per tau of ``dream.temperatures`` and write the study.

    Returns the content of ``results.json`` (``rows``, ``real_trained``, ...). Raises
    ``config.ConfigError`` if ``dream.temperatures`` is empty.
    """
    from worldmodels import figures

    temperatures = list(dict.fromkeys(cfg.dream.temperatures))  # in the given order, without repeats
    if not temperatures:
        raise config.ConfigError("dream.temperatures is empty")
    models = None
    rows = []
    for tau in temperatures:
        run_cfg = config.apply_overrides(cfg, {"controller.env": "dream", "dream.temperature": tau})
        prefix = f"[study tau={tau:g}]"
        print(f"{prefix} -> {output_dir(data_dir, run_cfg)}", flush=True)
        result = train_controller(run_cfg, data_dir, max_concurrent=max_concurrent, command=command,
                                  models=models, prefix=prefix)
        models = result["models"] or models  # load V and M once for the whole study
        rows.append(row_for(tau, result["out"], result["metrics"]))
        seeds = result["metrics"]["seeds"]

    real, reason = real_trained_row(data_dir, seeds, cfg.controller.max_steps)
    print(f"[study] {reason}")
    study = study_dir(data_dir)
    results = {"rows": rows, "real_trained": real, "command": command, "preset": cfg.preset,
               "settings": {key: config.get(cfg, key) for key in SETTINGS}}
    storage.atomic_write_json(study / "results.json", results)
    storage.atomic_write_text(study / "results.md", markdown_table(rows, cfg, real))
    figures.temperature_plot(study / "temperature.png", rows, real)
    print(markdown_table(rows, cfg, real))
    print(f"[study] -> {study / 'results.md'}, results.json, temperature.png")
    return results
