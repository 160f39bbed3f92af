"""``run_pipeline.py``'s library: stages 1-5 run in order as subprocesses, their times and their results.

Each stage is a :class:`Stage` (its script, its output folder and how its key numbers are read from
its ``metrics.json``); :func:`run` runs them with one preset, keeps each stage's time summed over
every run of the same command in ``<data-dir>/pipeline.json`` (updated every ``RECORD_EVERY``
seconds, so a killed run's time still counts), stops at a failed stage naming the command that
resumes, and ends with the summary.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import config
from worldmodels import artifacts, storage
from worldmodels.devices import VERBOSE_FLAG

REPO = Path(__file__).resolve().parent.parent  # where the numbered scripts are
RECORD_NAME = "pipeline.json"
# Seconds a stage gets to finish writing after Ctrl-C before it is killed.
INTERRUPT_GRACE = 30.0
# Seconds between updates of a running stage's time in pipeline.json: a killed pipeline loses at most this.
RECORD_EVERY = 30.0


def _episodes(folder: Path, metrics: dict | None) -> str:
    return f"{len(storage.list_episodes(folder))} episodes"


def _vision(folder: Path, metrics: dict | None) -> str:
    if not metrics:
        return "no metrics.json"
    return (f"held-out PSNR {metrics['psnr_db']:.2f} dB, MSE {metrics['reconstruction_mse']:.5f}, "
            f"KL {metrics['kl_per_frame']:.1f} nats/frame")


def _memory(folder: Path, metrics: dict | None) -> str:
    if not metrics:
        return "no metrics.json"
    # M's NLL means something only beside the best baseline fitted to the same kind of z.
    parts = []
    for kind, key, label in (("mu", "z_nll", "z = mu"), ("sampled", "z_nll_sampled", "z ~ V")):
        if metrics.get(key) is not None:
            baselines = metrics.get("baselines", {}).get(kind) or {}
            best = f" vs best baseline {min(baselines.values()):.4f}" if baselines else ""
            parts.append(f"{metrics[key]:.4f}{best} ({label})")
    return f"held-out z NLL {', '.join(parts)} nats/dim/step"


def _controller(folder: Path, metrics: dict | None) -> str:
    if not metrics:
        return "no metrics.json (final evaluation not run)"
    return f"score {metrics['mean']:.1f} +- {metrics['std']:.1f} on {metrics['episodes']} held-out tracks"


@dataclass(frozen=True)
class Stage:
    """One numbered script, where it writes, and how its key numbers are read for the summary."""

    script: str
    folder: Callable[[Path, config.Config], Path]
    numbers: Callable[[Path, dict | None], str]


STAGES = [
    Stage("01_generate_data.py", lambda d, c: artifacts.rollouts_dir(d), _episodes),
    Stage("02_train_vae.py", artifacts.vision_dir, _vision),
    Stage("03_generate_rnn_data.py", lambda d, c: artifacts.series_dir(d), _episodes),
    Stage("04_train_rnn.py", lambda d, c: artifacts.rnn_dir(d), _memory),
    Stage("05_train_controller.py", artifacts.controller_dir, _controller),
]


def duration(seconds: float) -> str:
    """``"15 min 19 s"``, ``"1 h 02 min"`` or ``"4.2 s"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def load_record(path: Path, arguments: list[str]) -> dict:
    """Per-stage seconds and done flags of earlier runs with the same ``arguments``; a fresh record otherwise."""
    try:
        record = storage.read_json(path)
    except (storage.MissingDataError, storage.CorruptFileError):
        record = {}
    if record.get("arguments") != arguments or not isinstance(record.get("stages"), dict):
        record = {"arguments": arguments, "stages": {}}
    return record


def stage_summary(stage: Stage, data_dir: Path, cfg: config.Config) -> str:
    """``"<key numbers> -> <folder>"`` of a finished stage; a missing or odd file is said, not raised."""
    folder = stage.folder(data_dir, cfg)
    try:
        metrics_path = folder / artifacts.METRICS_FILE
        metrics = storage.read_json(metrics_path) if metrics_path.is_file() else None
        numbers = stage.numbers(folder, metrics)
    except (storage.MissingDataError, storage.CorruptFileError, KeyError, TypeError, ValueError) as exc:
        numbers = f"cannot read its results ({type(exc).__name__}: {exc})"
    return f"{numbers} -> {folder}"


def run_stage(command: list[str], on_tick: Callable[[], None]) -> int:
    """Run one stage, calling ``on_tick`` every ``RECORD_EVERY`` seconds while it runs.

    On Ctrl-C (which the stage receives too) the stage gets time to save, then 130 is returned.
    """
    process = subprocess.Popen(command, cwd=REPO)
    try:
        while True:
            try:
                return process.wait(timeout=RECORD_EVERY)
            except subprocess.TimeoutExpired:
                on_tick()
    except KeyboardInterrupt:
        try:
            process.wait(timeout=INTERRUPT_GRACE)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            process.kill()
            process.wait()
        return 130


def run(cfg: config.Config, data_dir: Path, preset: str, overrides: Sequence[str], verbose: bool) -> int:
    """Run stages 1-5 as subprocesses with the same options, record their times, print the summary.

    Returns 0, the status of the stage that failed (after naming it and the command that
    resumes), or 130 after Ctrl-C.
    """
    common = ["--preset", preset, "--data-dir", str(data_dir)]
    for item in overrides:
        common += ["--set", item]
    if verbose:
        common.append(VERBOSE_FLAG)
    resume = shlex.join(["python", "run_pipeline.py", *common])
    record_path = Path(data_dir) / RECORD_NAME
    # Times add up over runs of the same pipeline only: the preset and the --set values.
    record = load_record(record_path, ["--preset", preset, *(f"--set={item}" for item in overrides)])
    ran: list[tuple[Stage, float, bool]] = []
    start = time.perf_counter()
    for number, stage in enumerate(STAGES, 1):
        print(f"[pipeline] === {stage.script} ===", flush=True)
        entry = record["stages"].setdefault(stage.script, {"seconds": 0.0, "done": False})
        was_done, earlier, stage_start = bool(entry["done"]), float(entry["seconds"]), time.perf_counter()

        def save(done: bool = False) -> None:
            entry.update(seconds=earlier + time.perf_counter() - stage_start, done=done)
            storage.atomic_write_json(record_path, record)

        status = run_stage([sys.executable, str(REPO / stage.script), *common], save)
        seconds = time.perf_counter() - stage_start
        save(done=status == 0)
        if status == 130:
            print(f"\n[pipeline] interrupted during stage {number} ({stage.script}); everything completed so far "
                  f"is saved. Resume with:\n  {resume}", file=sys.stderr)
            return 130
        if status != 0:
            print(f"[pipeline] stage {number} ({stage.script}) failed with status {status}; its error is above. "
                  f"Fix the cause, then resume with:\n  {resume}", file=sys.stderr)
            return status
        ran.append((stage, seconds, was_done))
    print(f"[pipeline] finished in {duration(time.perf_counter() - start)} "
          f"({duration(sum(e['seconds'] for e in record['stages'].values()))} over every run of this command "
          f"on {data_dir}). Results:")
    for stage, seconds, was_done in ran:
        total = duration(record["stages"][stage.script]["seconds"])
        note = f"already done (checked in {duration(seconds)}); " if was_done else ""
        print(f"  {stage.script:<24} {total:>12}  {note}{stage_summary(stage, data_dir, cfg)}")
    return 0
