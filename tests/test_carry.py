"""A carry of several searches on one V and M (``worldmodels.carry``), on stand-in files.

That a carried search resumes bit for bit is tested on a real search in test_train_controller.py;
here only which files travel, what ``carry.json`` says and which requests are refused, so the files
are placeholders and nothing is trained.
"""

from __future__ import annotations

import csv
import json

import pytest

import config
from tests.conftest import assert_user_error, run_plain
from worldmodels import carry, storage


def _search(folder, generations: int, model: str = "vae") -> None:
    """A search folder as stage 5 leaves it after ``generations`` generations (placeholder checkpoint)."""
    folder.mkdir(parents=True)
    config.save_config(config.make_config("smoke", {"vae.model": model}), folder)
    (folder / "evolution.pkl").write_bytes(b"checkpoint of " + str(folder).encode())
    (folder / "controller.npz").write_bytes(b"controller")
    with open(folder / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["generation", "elapsed", "env_steps"])
        writer.writeheader()
        writer.writerows({"generation": g, "elapsed": 10.0 * (g + 1), "env_steps": 100} for g in range(generations))


@pytest.fixture
def study(tmp_path):
    """A data folder with V (a VAE), M, a plain search and a seed study of two seeds, one of them scored."""
    data = tmp_path / "data"
    for sub, name in (("vae", "vae.keras"), ("rnn", "rnn.keras")):
        (data / sub).mkdir(parents=True)
        (data / sub / name).write_bytes(b"weights of " + sub.encode())
        config.save_config(config.make_config("smoke"), data / sub)
    _search(data / "controller", 5)
    _search(data / "controller_seeds" / "seed_0", 3)
    _search(data / "controller_seeds" / "seed_1", 2)
    (data / "controller_seeds" / "seed_0" / "evaluation_s2000000_n100.json").write_text('{"mean": 1.0}')
    (data / "rollouts").mkdir()
    (data / "rollouts" / "episode_000000.npz").write_bytes(b"frames")
    return data


def test_a_seed_study_travels_as_one_carry_with_v_and_m_once(study, tmp_path):
    out = tmp_path / "carry"
    info = carry.save(study, out, search=["controller_seeds/seed_*", "controller", "controller_seeds/seed_0"])
    listed = storage.verify_manifest(out, "carry")
    assert sorted(name for name in listed if name.endswith(".keras")) == ["rnn/rnn.keras", "vae/vae.keras"]
    for search in ("controller", "controller_seeds/seed_0", "controller_seeds/seed_1"):
        assert f"{search}/evolution.pkl" in listed and f"{search}/history.csv" in listed
    assert "controller_seeds/seed_0/evaluation_s2000000_n100.json" in listed
    assert not any(name.startswith("rollouts/") for name in listed)
    # The first search named (sorted within a pattern) gives the one-search fields; every search its own.
    assert (info["search"], info["generation"], info["env_steps"]) == ("controller_seeds/seed_0", 3, 300)
    assert {name: p["generation"] for name, p in info["searches"].items()} == {
        "controller_seeds/seed_0": 3, "controller_seeds/seed_1": 2, "controller": 5}
    assert json.loads((out / carry.INFO).read_text()) == info

    fresh = tmp_path / "fresh"
    restored = run_plain("-m", "worldmodels.carry", "restore", str(out), "--data-dir", str(fresh))
    assert restored.returncode == 0, restored.stderr
    assert "generation 3 of controller_seeds/seed_0/, generation 2 of controller_seeds/seed_1/" in restored.stdout
    for name in listed:
        if name != carry.INFO:
            assert storage.sha256(fresh / name) == storage.sha256(study / name), name

    # Saving again after a seed went on replaces what changed and drops nothing that is still listed.
    _search(study / "controller_seeds" / "seed_2", 1)
    again = carry.save(study, out, search="controller_seeds/seed_*")
    assert set(again["searches"]) == {f"controller_seeds/seed_{k}" for k in range(3)}
    assert "controller/evolution.pkl" not in storage.verify_manifest(out, "carry")


def test_a_carry_of_searches_on_two_v_kinds_or_of_no_search_is_refused(study, tmp_path):
    _search(study / "controller_gan", 1, model="vae_gan")
    with pytest.raises(ValueError, match="different V kinds"):
        carry.save(study, tmp_path / "mixed", search=["controller", "controller_gan"])
    proc = run_plain("-m", "worldmodels.carry", "save", "--data-dir", str(study), "--name", str(tmp_path / "none"),
                     "--search", "controller_dream_*")
    assert_user_error(proc, "controller_dream_*", "no search checkpoint")
    assert not (tmp_path / "none").exists()
