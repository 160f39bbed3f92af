"""Shared test set-up: headless, CPU only, quiet TensorFlow, and helpers to run the scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Set before anything imports TensorFlow or pygame (also inherited by script subprocesses).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, data_dir: Path, timeout: float = 600, check: bool = True,
               preset: str = "smoke") -> subprocess.CompletedProcess:
    """Run a numbered script as a user would: ``python <script> --preset smoke --data-dir <dir> ...``."""
    cmd = [sys.executable, str(REPO / script), "--preset", preset, "--data-dir", str(data_dir), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def smoke_rollouts(tmp_path_factory) -> Path:
    """A data dir with the smoke preset's rollouts, made once per test session by 01 itself."""
    data_dir = tmp_path_factory.mktemp("smoke_data")
    run_script("01_generate_data.py", data_dir=data_dir)
    return data_dir


def execute_notebook(path: Path, data_dir: Path, timeout: int = 600) -> None:
    """Execute a notebook top to bottom against ``data_dir`` (read from $WORLDMODELS_DATA), as nbmake would.

    A failing cell raises ``nbclient.exceptions.CellExecutionError`` with the cell's traceback.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    old = os.environ.get("WORLDMODELS_DATA")
    os.environ["WORLDMODELS_DATA"] = str(data_dir)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        if old is None:
            os.environ.pop("WORLDMODELS_DATA", None)
        else:
            os.environ["WORLDMODELS_DATA"] = old


@pytest.fixture(scope="session")
def smoke_vae(smoke_rollouts) -> Path:
    """The smoke data dir after 02_train_vae.py trained V on its rollouts (adds ``vae/``); returns the data dir."""
    run_script("02_train_vae.py", data_dir=smoke_rollouts)
    return smoke_rollouts


@pytest.fixture(scope="session")
def smoke_rnn(smoke_vae, tmp_path_factory) -> Path:
    """A smoke data dir after 03 encoded the series and 04 trained M: ``rollouts/``, ``vae/``, ``series/``, ``rnn/``.

    It starts from a copy of ``smoke_vae``'s rollouts and V (without V's training checkpoint), so
    that the folder the stage-2 tests inspect stays exactly as 02 left it.
    """
    import shutil

    data_dir = tmp_path_factory.mktemp("smoke_rnn")
    shutil.copytree(smoke_vae / "rollouts", data_dir / "rollouts")
    shutil.copytree(smoke_vae / "vae", data_dir / "vae", ignore=shutil.ignore_patterns("checkpoint", "*.weights.h5"))
    run_script("03_generate_rnn_data.py", data_dir=data_dir)
    run_script("04_train_rnn.py", data_dir=data_dir)
    return data_dir


def run_plain(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A script (or ``"-m", "module"``) run without the ``--preset`` and ``--data-dir`` that :func:`run_script` adds."""
    target = [script] if script.startswith("-") else [str(REPO / script)]
    return subprocess.run([sys.executable, *target, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *fragments) -> None:
    """A script refused bad input as it should: exit 2, no traceback, and a message naming what is wrong."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert str(fragment) in proc.stderr, (fragment, proc.stderr)


def check_notebook(path: Path, data_dir: Path) -> None:
    """A committed notebook has no outputs (clean diffs) and executes top to bottom on ``data_dir``."""
    import nbformat

    for cell in nbformat.read(str(path), as_version=4).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} is committed with outputs"
    execute_notebook(path, data_dir)


def data_dir_with(source: Path, tmp_path: Path, *names: str) -> Path:
    """A fresh data dir holding links to the given folders of ``source`` (e.g. "vae", "rnn")."""
    data = tmp_path / "data"
    data.mkdir(parents=True)
    for name in names:
        (data / name).symlink_to(source / name, target_is_directory=True)
    return data


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_npz(path: Path) -> dict:
    import numpy as np

    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def run_until_then_kill(cmd: list[str], ready, timeout: float = 180) -> None:
    """Start ``cmd`` in its own process group, wait until ``ready()`` is true, then SIGKILL the whole group.

    A new session puts a script and its worker processes in one process group, so SIGKILL takes
    them all at once, as a lost machine would. Fails if the command ends before it is killed.
    """
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, f"{cmd[1]} ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_then_resume_controller(data: Path, out: Path, reference: Path, train: tuple[str, ...],
                                generations: int) -> subprocess.CompletedProcess:
    """SIGKILL ``05_train_controller.py`` after its first generation, rerun it, and check it ends where ``reference`` did.

    ``out`` is the controller folder the run writes in ``data``; ``reference`` the folder of the same
    search run without interruption. Returns the resumed run for further checks.
    """
    import numpy as np

    cmd = [sys.executable, str(REPO / "05_train_controller.py"), "--preset", "smoke", "--data-dir", str(data),
           *train, "--no-final-eval"]
    run_until_then_kill(cmd, lambda: (out / "history.csv").exists() and len(read_csv(out / "history.csv")) >= 1)
    done = len(read_csv(out / "history.csv"))
    assert 1 <= done < generations, "the kill should land after the first generation and before the last"

    resumed = run_script("05_train_controller.py", *train, "--no-final-eval", data_dir=data)
    assert f"{done} of {generations} generations done" in resumed.stdout
    got, want = load_npz(out / "controller.npz"), load_npz(reference / "controller.npz")
    for key in ("mean", "params", "best_member", "best_eval_generation", "best_eval_mean"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    def scores(rows):  # an evaluation's "seconds" is wall time, the one column a resume may change
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert scores(read_csv(out / "eval.csv")) == scores(read_csv(reference / "eval.csv"))
    return resumed


def assert_replays_in_the_real_env(episode: dict, max_steps: int, truncation: bool = True) -> None:
    """An episode file is one real episode: its actions from its track seed give back its frames and rewards.

    ``obs[t]`` is the frame before ``action[t]``; ``terminated`` must match at every step, and so must
    ``truncated`` unless ``truncation`` is False (a window cut out of a longer episode ends early).
    """
    import numpy as np

    from worldmodels.env import make_env, preprocess

    env = make_env(max_steps)
    try:
        obs, _ = env.reset(seed=int(episode["seed"]))
        for t, action in enumerate(episode["action"]):
            np.testing.assert_array_equal(preprocess(obs), episode["obs"][t], err_msg=f"frame {t}")
            obs, reward, terminated, truncated, _ = env.step(action)
            assert np.float32(reward) == episode["reward"][t], f"reward of step {t}"
            assert terminated == episode["terminated"][t], f"terminated at step {t}"
            assert not truncation or truncated == episode["truncated"][t], f"truncated at step {t}"
    finally:
        env.close()


def assert_old_configs_match_the_option_off(tmp_path: Path, section: str, new_fields, keys, turned_on: dict) -> None:
    """A config.json saved before ``section``'s ``new_fields`` existed is compatible with their defaults
    (under the artifact ``keys``) and refuses a run that turns the option on (``turned_on``)."""
    import json

    import config

    config.save_config(config.make_config("smoke"), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for name in new_fields:
        del saved[section][name]
    old = config.from_dict(saved)
    config.check_compatible(old, config.make_config("smoke"), keys, "old")
    with pytest.raises(config.ConfigError, match=next(iter(turned_on))):
        config.check_compatible(old, config.make_config("smoke", turned_on), keys, "old")


class ActionLog:
    """A world (``worldmodels.rollout``) that records the actions it is given: the inner world of a NoisyWorld."""

    capacity, z_size, hidden_size = 8, 2, 3

    def __init__(self):
        self.actions = []

    def reset(self, seeds):
        return np.zeros((len(seeds), 2)), np.zeros((len(seeds), 3))

    def step(self, env_actions, active):
        self.actions.append(np.array(env_actions))
        n = len(env_actions)
        return (np.zeros((n, 2)), np.zeros((n, 3))), np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)


def noisy_actions(seeds, scale, steps=200, action=(0.0, 0.5, 0.0), **lapses):
    """The actions (B, steps, 3) a ``recording.NoisyWorld`` (noise std ``scale``, ``lapses``: its steering lapse
    arguments) applies to episodes on tracks ``seeds`` (B,) when C always asks for ``action``."""
    from worldmodels.recording import NoisyWorld

    log = ActionLog()
    world = NoisyWorld(log, scale, **lapses)
    world.reset(np.asarray(seeds))
    for _ in range(steps):
        world.step(np.tile(np.float32(action), (len(seeds), 1)), np.ones(len(seeds), bool))
    return np.stack(log.actions, axis=1)
