"""run_pipeline.py: its help, --help-config, $WORLDMODELS_DATA, a failed stage, and the closing summary."""

import os
import subprocess
import sys

import config
from tests.conftest import REPO
from worldmodels import storage


def pipeline_module():
    from worldmodels import pipeline

    return pipeline


def run_pipeline(*args, env_changes=None, timeout=300):
    env = dict(os.environ, **(env_changes or {}))
    return subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_option():
    proc = run_pipeline("--help")
    assert proc.returncode == 0, proc.stderr
    for option, words in (("--preset", "default: quick"), ("--set", "repeatable"), ("--data-dir", "WORLDMODELS_DATA"),
                          ("--help-config", "every config field"), ("--verbose", "TensorFlow")):
        assert option in proc.stdout and words in proc.stdout, (option, proc.stdout)


def test_help_config_shows_the_preset_values():
    proc = run_pipeline("--preset", "smoke", "--set", "rnn.steps=7", "--help-config")
    assert proc.returncode == 0, proc.stderr
    assert f"data.episodes = {config.make_config('smoke').data.episodes!r}  (paper: 10000)" in proc.stdout
    assert "rnn.steps = 7  (paper: 4000)" in proc.stdout


def test_a_failed_stage_stops_the_pipeline_naming_it_and_the_resume_command(tmp_path):
    # A file where stage 1's rollouts folder should be makes stage 1 fail at once; the data
    # folder comes from $WORLDMODELS_DATA alone, so the error naming it shows it was honoured.
    data = tmp_path / "from_environment"
    data.mkdir()
    (data / "rollouts").write_text("not a folder")
    proc = run_pipeline("--preset", "smoke", env_changes={"WORLDMODELS_DATA": str(data)})
    assert proc.returncode not in (0, None)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert str(data / "rollouts") in proc.stderr
    assert "stage 1 (01_generate_data.py) failed" in proc.stderr
    assert f"python run_pipeline.py --preset smoke --data-dir {data}" in proc.stderr
    assert "02_train_vae.py" not in proc.stdout  # it stopped at the failed stage
    record = storage.read_json(data / "pipeline.json")
    assert record["stages"]["01_generate_data.py"]["done"] is False


def test_record_adds_up_only_runs_of_the_same_pipeline(tmp_path):
    module = pipeline_module()
    path = tmp_path / "pipeline.json"
    storage.atomic_write_json(path, {"arguments": ["--preset", "quick"],
                                     "stages": {"01_generate_data.py": {"seconds": 5.0, "done": True}}})
    assert module.load_record(path, ["--preset", "quick"])["stages"]["01_generate_data.py"]["seconds"] == 5.0
    assert module.load_record(path, ["--preset", "small"])["stages"] == {}
    path.write_text("{broken")
    assert module.load_record(path, ["--preset", "quick"])["stages"] == {}


def test_summary_reads_each_stage_key_numbers(tmp_path):
    module = pipeline_module()
    cfg = config.make_config("smoke")
    storage.atomic_write_json(tmp_path / "vae" / "metrics.json",
                              {"psnr_db": 27.5, "reconstruction_mse": 0.0018, "kl_per_frame": 16.2})
    storage.atomic_write_json(tmp_path / "rnn" / "metrics.json",
                              {"z_nll": 0.91, "z_nll_sampled": 1.41, "baselines": {
                                  "mu": {"persistence": 1.2, "unconditional": 1.4},
                                  "sampled": {"persistence": 1.78, "unconditional": 1.42}}})
    storage.atomic_write_json(tmp_path / "controller" / "metrics.json", {"mean": 612.34, "std": 80.0, "episodes": 100})
    lines = {stage.script: module.stage_summary(stage, tmp_path, cfg) for stage in module.STAGES}
    assert "PSNR 27.50 dB" in lines["02_train_vae.py"]
    assert "z NLL 0.9100 vs best baseline 1.2000 (z = mu), 1.4100 vs best baseline 1.4200 (z ~ V)" \
        in lines["04_train_rnn.py"]
    assert "score 612.3 +- 80.0 on 100 held-out tracks" in lines["05_train_controller.py"]
    assert "cannot read its results" in lines["01_generate_data.py"]  # no rollouts: said, not raised
    assert module.duration(919) == "15 min 19 s" and module.duration(3720) == "1 h 02 min"
