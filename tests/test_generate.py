"""01_generate_data.py as a user runs it: output layout, determinism, and surviving SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import REPO, run_script
from worldmodels import policies, storage
from worldmodels.collect import record_episode
from worldmodels.env import episode_seed


def test_smoke_rollouts_are_valid(smoke_rollouts):
    paths = storage.list_episodes(smoke_rollouts / "rollouts")
    assert [p.name for p in paths] == [storage.episode_name(i) for i in range(3)]
    for path in paths:
        ep = storage.load_episode(path)
        assert ep["obs"].shape[1:] == (64, 64, 3) and len(ep["obs"]) == 60
    assert (smoke_rollouts / "rollouts" / "config.json").exists()


def test_rerun_of_a_finished_run_records_nothing(smoke_rollouts):
    before = {p: p.stat().st_mtime_ns for p in storage.list_episodes(smoke_rollouts / "rollouts")}
    proc = run_script("01_generate_data.py", data_dir=smoke_rollouts)
    assert "3 of 3 episodes already complete; recording 0" in proc.stdout
    assert before == {p: p.stat().st_mtime_ns for p in storage.list_episodes(smoke_rollouts / "rollouts")}


def test_sigkill_then_rerun_gives_exactly_n_identical_episodes(tmp_path, smoke_rollouts):
    n = 10
    args = [sys.executable, str(REPO / "01_generate_data.py"), "--preset", "smoke", "--data-dir", str(tmp_path),
            "--set", f"data.episodes={n}", "--set", "data.workers=2"]
    folder = tmp_path / "rollouts"
    # A new session makes the script and its worker processes one process group, so SIGKILL
    # takes them all at once, as when a machine is switched off.
    proc = subprocess.Popen(args, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if folder.is_dir() and len([p for p in folder.iterdir() if storage.episode_index(p) is not None]) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = [p for p in folder.iterdir() if storage.episode_index(p) is not None]
    assert 2 <= len(complete) < n, "the kill should land in the middle of the run"
    # What a kill during a write leaves behind: a temporary file, and (from some other
    # tool) a truncated episode. Both must be cleaned up and recorded again.
    (folder / ".episode_000007.npz.x1y2.tmp").write_bytes(b"partial")
    victim = sorted(complete)[0]
    victim.write_bytes(victim.read_bytes()[:1000])

    rerun = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "partial file" in rerun.stdout and "unreadable" in rerun.stdout
    paths = storage.list_episodes(folder)
    assert [p.name for p in paths] == [storage.episode_name(i) for i in range(n)]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    # Every episode is exactly what an uninterrupted run records (the first 3 exist in the
    # uninterrupted smoke run made with the same base seed).
    for i in range(3):
        a = storage.load_episode(paths[i])
        b = storage.load_episode(smoke_rollouts / "rollouts" / storage.episode_name(i))
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_incompatible_rerun_is_refused(smoke_rollouts):
    proc = run_script("01_generate_data.py", "--set", "data.max_steps=80", data_dir=smoke_rollouts, check=False)
    assert proc.returncode == 2
    assert "incompatible config" in proc.stderr and "data.max_steps" in proc.stderr


def test_each_episode_records_its_policy(smoke_rollouts):
    for path in storage.list_episodes(smoke_rollouts / "rollouts"):
        assert storage.load_episode(path, keys=("policy",))["policy"] == "brownian"


def test_a_policy_mix_gives_each_episode_the_policy_of_its_index(tmp_path):
    spec = "expert:0.5,brownian:0.5"
    run_script("01_generate_data.py", "--set", f"data.policy={spec}", "--set", "data.episodes=4",
               "--set", "data.max_steps=30", data_dir=tmp_path)
    tags = [str(storage.load_episode(p, keys=("policy",))["policy"]) for p in storage.list_episodes(tmp_path / "rollouts")]
    assert tags == [policies.episode_policy(spec, 0, i) for i in range(4)]
    assert set(tags) == {"expert", "brownian"}
    # An episode is the one its policy records on its own (seed and policy reproduce it).
    i = tags.index("expert")
    alone = record_episode(30, "expert", episode_seed(0, i))
    stored = storage.load_episode(tmp_path / "rollouts" / storage.episode_name(i))
    for key in alone:
        np.testing.assert_array_equal(stored[key], alone[key])


def test_a_bad_policy_mix_is_refused_before_recording(tmp_path):
    proc = run_script("01_generate_data.py", "--set", "data.policy=expert:0.5,brownian:0.4", data_dir=tmp_path,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data.policy" in proc.stderr and "sum to 0.9, not 1" in proc.stderr
    assert not (tmp_path / "rollouts").exists()
