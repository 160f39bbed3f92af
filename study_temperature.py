"""The temperature study: train C in M's dream at each tau, score each in the real CarRacing.

    python study_temperature.py --preset small
    python study_temperature.py --set dream.temperatures=0.5,1.0,1.15,1.3 --set controller.generations=100

For every tau in ``dream.temperatures`` this runs stage 5 in the dream
(``worldmodels.controller_training.train_controller`` with ``controller.env=dream``, exactly
what ``05_train_controller.py --env dream --set dream.temperature=<tau>`` runs) into
``<data-dir>/controller_dream_t<tau>/``. Each controller is selected by its dream score and
finally scored on the same ``controller.final_eval_episodes`` held-out real tracks (and on as
many held-out dream episodes at its own tau). The paper's Doom table (REFERENCE.md) showed that
at a low tau the controller exploits M: a high dream score and a poor real one.

Writes ``<data-dir>/temperature_study/``: ``results.md`` (a table like the paper's: tau, score
in the dream, score in the real environment, mean +- std), ``results.json`` (the same numbers
with the settings and folders) and ``temperature.png`` (both scores per tau with error bars). If
``<data-dir>/controller/metrics.json`` (the controller trained in the real environment by
``05_train_controller.py``) was scored on the same held-out tracks, it is a row of the table and a
line in the plot.

Resumable: each tau's search resumes where it stopped, finished ones are skipped, and the
results are rewritten from the ``metrics.json`` files at the end.
"""

from __future__ import annotations

import io
import shlex
import sys
from pathlib import Path

import config
from worldmodels import cli, storage
from worldmodels.controller_training import DEFAULT_MAX_CONCURRENT, output_dir, train_controller

# TensorFlow is imported when the models are loaded, after the argument checks (and not in
# the spawned environment workers, which re-import this script).

STUDY_DIR = "temperature_study"
PAPER_DOOM = "Ha & Schmidhuber 2018, Doom take cover (REFERENCE.md): at tau 0.1 and 0.5 the dream score is ~2000 " \
             "and the real one ~200; at tau 1.15 the real score is best (1092 +- 556)."


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
    path = Path(data_dir) / "controller" / "metrics.json"
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


def plot(path: Path, rows: list[dict], real: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = [r["temperature"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(taus, [r["dream_mean"] for r in rows], yerr=[r["dream_std"] for r in rows], fmt="s--", capsize=4,
                label="score in the dream")
    ax.errorbar(taus, [r["real_mean"] for r in rows], yerr=[r["real_std"] for r in rows], fmt="o-", capsize=4,
                label="score in the real CarRacing-v3")
    if real is not None:  # the controller trained in the real environment, on the same tracks
        ax.axhline(real["real_mean"], color="k", lw=1, label="trained in the real env (+- std)")
        ax.axhspan(real["real_mean"] - real["real_std"], real["real_mean"] + real["real_std"], color="k", alpha=0.08)
    ax.set_xlabel("temperature tau")
    ax.set_ylabel("return (mean +- std)")
    ax.set_title("C trained in M's dream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.atomic_write_bytes(path, buffer.getvalue())


def main(argv=None) -> int:
    parser = config.make_parser(__doc__)
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT, metavar="N",
                        help=f"at most N real environments at once (default {DEFAULT_MAX_CONCURRENT})")
    cfg, args = config.parse_args(__doc__, argv, parser)
    if args.max_concurrent < 1:
        parser.error(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    temperatures = list(dict.fromkeys(cfg.dream.temperatures))  # in the given order, without repeats
    if not temperatures:
        parser.error("dream.temperatures is empty")
    command = shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    models = None
    rows = []
    for tau in temperatures:
        run_cfg = config.apply_overrides(cfg, {"controller.env": "dream", "dream.temperature": tau})
        prefix = f"[study tau={tau:g}]"
        print(f"{prefix} -> {output_dir(args.data_dir, run_cfg)}", flush=True)
        result = train_controller(run_cfg, args.data_dir, max_concurrent=args.max_concurrent, command=command,
                                  models=models, prefix=prefix)
        models = result["models"] or models  # load V and M once for the whole study
        rows.append(row_for(tau, result["out"], result["metrics"]))
        seeds = result["metrics"]["seeds"]

    real, reason = real_trained_row(args.data_dir, seeds, cfg.controller.max_steps)
    print(f"[study] {reason}")

    study = args.data_dir / STUDY_DIR
    storage.atomic_write_json(study / "results.json", {
        "rows": rows, "real_trained": real, "command": command, "preset": cfg.preset,
        "settings": {key: config.get(cfg, key) for key in (
            "controller.generations", "controller.population", "controller.rollouts_per_member",
            "controller.final_eval_episodes", "controller.max_steps", "controller.seed", "dream.max_steps",
            "dream.skip_initial_frames")}})
    storage.atomic_write_text(study / "results.md", markdown_table(rows, cfg, real))
    plot(study / "temperature.png", rows, real)
    print(markdown_table(rows, cfg, real))
    print(f"[study] -> {study / 'results.md'}, results.json, temperature.png")
    return 0


if __name__ == "__main__":
    cli.run(main)
