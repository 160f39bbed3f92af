"""Run the whole pipeline, stage by stage, with one preset: 01 -> 05.

    python run_pipeline.py --preset quick          # ~30 minutes on 2 CPU cores
    python run_pipeline.py --preset small --data-dir /mnt/ebs/data

Every stage resumes where it stopped, so rerunning this command after an interruption
(Ctrl-C, SIGKILL, a stopped or terminated instance) redoes nothing that was finished.
Extra ``--set`` options are passed to every stage.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import config
from worldmodels import artifacts

REPO = Path(__file__).resolve().parent
STAGES = [
    ("01_generate_data.py", artifacts.ROLLOUTS),
    ("02_train_vae.py", artifacts.VISION["vae"][0]),
    ("03_generate_rnn_data.py", artifacts.SERIES),
    ("04_train_rnn.py", artifacts.RNN[0]),
    ("05_train_controller.py", artifacts.CONTROLLER),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quick", choices=sorted(config.PRESETS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    parser.add_argument("--data-dir", default="data", type=Path)
    args = parser.parse_args(argv)
    # Validate once here so that a typo fails in a second, not after stage 1.
    try:
        config.make_config(args.preset, config.parse_set_arguments(args.overrides))
    except config.ConfigError as exc:
        parser.error(str(exc))
    common = ["--preset", args.preset, "--data-dir", str(args.data_dir)]
    for item in args.overrides:
        common += ["--set", item]
    timings = []
    for script, output in STAGES:
        if not (REPO / script).exists():
            print(f"[pipeline] {script} does not exist yet in this version; skipping it", flush=True)
            continue
        print(f"[pipeline] === {script} ===", flush=True)
        start = time.perf_counter()
        status = subprocess.call([sys.executable, str(REPO / script), *common], cwd=REPO)
        if status != 0:
            print(f"[pipeline] {script} failed with status {status}; fix the cause and rerun this command "
                  "to continue from where it stopped", file=sys.stderr)
            return status
        timings.append((script, output, time.perf_counter() - start))
    print("[pipeline] finished. Results:")
    for script, output, seconds in timings:
        print(f"  {script:<26} {seconds:8.1f} s  -> {args.data_dir / output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
