"""What the repository ships as files: the trained agents in ``pretrained/`` and the carried searches in
``checkpoints/`` are intact (every file matches its SHA-256 manifest), small enough, and described.

A clone that received a damaged or half-committed agent would otherwise fail only when a user runs
``evaluate_controller.py --pretrained``; these checks read the committed files and need no training.
"""

from __future__ import annotations

import pytest

import config
from tests.conftest import REPO
from worldmodels import artifacts, carry, pretrained, storage

# Issue #18: the best agent, V's encoder and decoder, M, C and the config, "at most ~25 MB in all".
MAX_AGENT_BYTES = 25 * 2**20
AGENTS = pretrained.available()
CARRIES = carry.available()


def _size(folder) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.mark.parametrize("name", AGENTS)
def test_every_shipped_agent_matches_its_manifest_and_the_size_limit(name):
    folder = pretrained.folder(name)
    pretrained.verify(folder)  # CorruptFileError naming the file on any mismatch
    assert _size(folder) <= MAX_AGENT_BYTES, f"pretrained/{name} is {_size(folder) / 2**20:.1f} MB"
    cfg = config.load_config(folder / pretrained.CONFIG)
    assert cfg.vae.model in ("vae", "vae_gan") and cfg.controller.z_input in ("sample", "mean")


@pytest.mark.parametrize("name", AGENTS)
def test_the_readme_names_every_shipped_agent(name):
    assert f"--pretrained {name}" in (REPO / "README.md").read_text(), f"README does not say how to score {name}"


@pytest.mark.parametrize("name", CARRIES)
def test_every_carried_search_matches_its_manifest(name):
    listed = storage.verify_manifest(carry.folder(name), "carry")
    assert carry.INFO in listed
    # A search's carry holds its checkpoint; one of the iterative procedure between iterations may hold none.
    if storage.read_json(carry.folder(name) / carry.INFO)["search"] == artifacts.ITERATIONS:
        assert "iterations/config.json" in listed
    else:
        assert any(path.endswith("evolution.pkl") for path in listed)
