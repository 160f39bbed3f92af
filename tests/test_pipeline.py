"""The whole pipeline as the container runs it (run_pipeline.py), killed mid-stage and restarted.

An EC2 instance can be terminated at any moment; rerunning the same command on the same
data/ must finish the pipeline, redo nothing that was finished, and end with the artifacts an
uninterrupted run produces.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import REPO
from worldmodels import storage


def pipeline(data_dir):
    return [sys.executable, str(REPO / "run_pipeline.py"), "--preset", "smoke", "--data-dir", str(data_dir)]


def run_to_end(data_dir):
    proc = subprocess.run(pipeline(data_dir), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_sigkill_mid_stage_then_restart_matches_an_uninterrupted_run(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    out = run_to_end(reference)
    assert "[pipeline] finished" in out
    # The summary gives each stage's key numbers, read from its metrics.json.
    for numbers in ("3 episodes", "held-out PSNR", "held-out z NLL", "held-out tracks"):
        assert numbers in out.split("[pipeline] finished")[1], numbers

    # Kill the whole process group (pipeline, stage, workers) once stage 2 has written its first checkpoint.
    proc = subprocess.Popen(pipeline(interrupted), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = interrupted / "vae" / "checkpoint" / "training_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the pipeline ended before it could be killed mid-stage"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "vae" / "metrics.json").exists(), "the kill should land inside stage 2"
    rollouts_before = {p.name: p.stat().st_mtime_ns for p in storage.list_episodes(interrupted / "rollouts")}

    out = run_to_end(interrupted)
    assert "3 of 3 episodes already complete; recording 0" in out  # stage 1 was not redone
    assert rollouts_before == {p.name: p.stat().st_mtime_ns for p in storage.list_episodes(interrupted / "rollouts")}

    # Same artifacts as the uninterrupted run.
    for ref_path in storage.list_episodes(reference / "rollouts"):
        a, b = storage.load_episode(ref_path), storage.load_episode(interrupted / "rollouts" / ref_path.name)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for ref_path in storage.list_episodes(reference / "series"):
        a = storage.load_episode(ref_path, "series")
        b = storage.load_episode(interrupted / "series" / ref_path.name, "series")
        np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-4, atol=1e-5)
    for stage, keys in (("vae", ("reconstruction_mse", "kl_per_frame")), ("rnn", ("z_nll",))):
        a = json.loads((reference / stage / "metrics.json").read_text())
        b = json.loads((interrupted / stage / "metrics.json").read_text())
        for key in keys:
            if key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-4, err_msg=f"{stage}/{key}")
    with np.load(reference / "controller" / "controller.npz") as a, \
            np.load(interrupted / "controller" / "controller.npz") as b:
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-4, atol=1e-6)

    # A third run redoes nothing at all.
    # pipeline.json (the pipeline's own time record) is the one file it rewrites.
    mtimes = {p: p.stat().st_mtime_ns for p in interrupted.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    out = run_to_end(interrupted)
    assert mtimes == {p: p.stat().st_mtime_ns for p in interrupted.rglob("*") if p.is_file() and p.name != "pipeline.json"}
    assert out.count("already done (checked in") == 5  # and the summary says so
