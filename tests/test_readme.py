"""README is the project's report: every image it shows exists, and every entry point is documented."""

import re

import pytest

from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")

# What a user runs: the numbered stages, the helpers beside them, the benchmarks, the notebooks.
ENTRY_POINTS = sorted(
    [p.name for p in REPO.glob("[0-9][0-9]_*.py")]
    + ["run_pipeline.py", "evaluate_controller.py", "study_temperature.py", "study_seeds.py",
       "tools/docker_check.sh"]
    + [f"benchmarks/{p.name}" for p in (REPO / "benchmarks").glob("bench_*.py")]
    + [f"notebooks/{p.name}" for p in (REPO / "notebooks").glob("*.ipynb")]
)


def test_every_image_readme_links_to_exists():
    links = re.findall(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)", README)
    links += re.findall(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", README, flags=re.IGNORECASE)
    local = [link for link in links if not re.match(r"^[a-z]+://", link)]
    assert local, "README links no image"
    missing = [link for link in local if not (REPO / link.split("#")[0]).is_file()]
    assert not missing, f"README links to missing images: {missing}"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_readme_documents_every_entry_point(entry):
    assert (REPO / entry).exists(), entry
    assert entry in README, f"README never mentions {entry}"


def test_readme_has_every_stage_section():
    headings = re.findall(r"^#{2,3} (.+)$", README, flags=re.M)
    for stage in ("Stage 1", "Stage 2", "Stage 3", "Stage 4", "Stage 5", "The dream", "Results", "VAE-GAN",
                  "Running on a GPU box / EC2", "Tests", "References"):
        assert any(h.startswith(stage) for h in headings), f"README lost its {stage!r} section"
