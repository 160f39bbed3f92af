"""The hybrid (issue #19): a dream-trained C fine-tuned in the real environment by stage 5 with
``controller.init_from``, in its own folder, resumable, and refused from another start."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from tests.conftest import assert_user_error, data_dir_with, kill_then_resume_controller, load_npz, read_csv, run_script

SCRIPT = "05_train_controller.py"
GENERATIONS = 3
DREAM = "controller_dream_t1.15"
HYBRID = ("--set", f"controller.generations={GENERATIONS}", "--set", "controller.max_steps=30",
          "--set", f"controller.init_from={DREAM}")


@pytest.fixture(scope="module")
def hybrid(smoke_rnn, tmp_path_factory):
    """A dream-trained controller (stage 5 in the dream), then the hybrid search started from it."""
    data = data_dir_with(smoke_rnn, tmp_path_factory.mktemp("hybrid"), "vae", "rnn", "series")
    run_script(SCRIPT, "--env", "dream", "--no-final-eval", data_dir=data)
    proc = run_script(SCRIPT, *HYBRID, data_dir=data)
    return data, proc


def test_the_hybrid_starts_at_the_dream_controller_and_writes_its_own_folder(hybrid):
    import json

    data, proc = hybrid
    start = load_npz(data / DREAM / "controller.npz")["params"]
    assert np.any(start != 0)
    out = data / "controller_hybrid"
    state = pickle.loads((out / "evolution.pkl").read_bytes())
    np.testing.assert_array_equal(state["es"].x0, start)  # the first generation's CMA mean
    assert len(read_csv(out / "history.csv")) == GENERATIONS
    assert not (data / "controller").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init_from"] == DREAM and metrics["env"] == "real"
    assert json.loads((out / "config.json").read_text())["controller"]["init_from"] == DREAM
    assert f"starts from the controller {data / DREAM / 'controller.npz'}" in proc.stdout
    # The dream controller it started from is left as it was.
    assert load_npz(data / DREAM / "controller.npz")["params"].tolist() == start.tolist()


def test_the_hybrid_resumes_after_sigkill_to_the_uninterrupted_result(hybrid, smoke_rnn, tmp_path):
    data = data_dir_with(smoke_rnn, tmp_path, "vae", "rnn")
    shutil.copytree(hybrid[0] / DREAM, data / DREAM)
    kill_then_resume_controller(data, data / "controller_hybrid", hybrid[0] / "controller_hybrid", HYBRID, GENERATIONS)


def test_another_start_or_a_start_of_another_m_is_refused(hybrid, tmp_path):
    data = hybrid[0]
    other = data / "controller_dream_t2"
    if not other.exists():
        shutil.copytree(data / DREAM, other)
    proc = run_script(SCRIPT, *HYBRID, "--set", "controller.init_from=controller_dream_t2", data_dir=data, check=False)
    assert_user_error(proc, "controller.init_from")
    proc = run_script(SCRIPT, *HYBRID, "--env", "dream", data_dir=data, check=False)
    assert_user_error(proc, "controller.init_from", "controller.env=real")
    # A controller of another M (an iteration's, say): C would read the wrong M's h.
    fresh = data_dir_with(data, tmp_path, "vae", "rnn")
    elsewhere = fresh / "iterations" / "iter_001" / "controller"
    elsewhere.mkdir(parents=True)
    shutil.copy(data / DREAM / "controller.npz", elsewhere / "controller.npz")
    shutil.copytree(data / "rnn", elsewhere.parent / "rnn")
    proc = run_script(SCRIPT, *HYBRID, "--set", "controller.init_from=iterations/iter_001/controller",
                      data_dir=fresh, check=False)
    assert_user_error(proc, "was trained with the M of")
    proc = run_script(SCRIPT, *HYBRID, "--set", "controller.init_from=nowhere", data_dir=fresh, check=False)
    assert_user_error(proc, "nowhere")
