"""config.py: presets, typed --set overrides, clear errors, JSON round-trip, compatibility checks."""

import json

import pytest

import config
from tests.conftest import run_script


def test_defaults_are_the_papers_numbers():
    cfg = config.make_config("paper")
    assert cfg.vae.z_size == 32 and cfg.vae.kl_tolerance == 0.5 and cfg.vae.batch_size == 100
    assert cfg.rnn.hidden_units == 256 and cfg.rnn.num_mixtures == 5 and cfg.rnn.sequence_length == 999
    assert cfg.controller.population == 64 and cfg.controller.rollouts_per_member == 16
    assert cfg.controller.sigma_init == 0.1 and cfg.data.episodes == 10_000


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_presets_never_change_network_shapes(preset):
    cfg, paper = config.make_config(preset), config.make_config("paper")
    for key in ("vae.z_size", "rnn.hidden_units", "rnn.num_mixtures"):
        assert config.get(cfg, key) == config.get(paper, key)


def test_set_overrides_are_typed():
    cfg = config.make_config("smoke", {"vae.epochs": "3", "vae.learning_rate": "2e-4",
                                       "vae.mixed_precision": "true", "dream.temperatures": "0.5, 1.3",
                                       "data.episodes": "1_000"})
    assert cfg.vae.epochs == 3 and isinstance(cfg.vae.epochs, int)
    assert cfg.vae.learning_rate == pytest.approx(2e-4)
    assert cfg.vae.mixed_precision is True
    assert cfg.dream.temperatures == (0.5, 1.3)
    assert cfg.data.episodes == 1000


@pytest.mark.parametrize("overrides, message", [
    ({"vae.epoch": "3"}, "valid fields of 'vae'"),
    ({"vea.epochs": "3"}, "section one of"),
    ({"epochs": "3"}, "section.field"),
    ({"vae.epochs": "2.5"}, "expected an integer"),
    ({"vae.epochs": "many"}, "vae.epochs"),
    ({"vae.mixed_precision": "maybe"}, "true/false"),
    ({"vae.model": "gan"}, "vae, vae_gan"),
    ({"data.episodes": "0"}, "must be positive"),
    ({"dream.temperature": "0"}, "> 0"),
    ({"vae.heldout_fraction": "1.5"}, "[0, 1)"),
    ({"rnn.scheduled_sampling": "1.5"}, "rnn.scheduled_sampling must be a probability in [0, 1]"),
])
def test_bad_overrides_give_clear_errors(overrides, message):
    with pytest.raises(config.ConfigError, match=None) as info:
        config.make_config("smoke", overrides)
    assert message in str(info.value)


def test_unknown_preset():
    with pytest.raises(config.ConfigError, match="choose one of"):
        config.make_config("huge")


def test_set_argument_needs_equals():
    with pytest.raises(config.ConfigError, match="section.field=value"):
        config.parse_set_arguments(["vae.epochs"])


def test_json_round_trip(tmp_path):
    cfg = config.make_config("small", {"dream.temperatures": "0.1,1.0"})
    config.save_config(cfg, tmp_path)
    assert config.load_config(tmp_path / "config.json") == cfg


def test_saved_config_with_unknown_key_is_rejected(tmp_path):
    data = config.to_dict(config.make_config("smoke"))
    data["vae"]["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(config.ConfigError, match="bogus"):
        config.load_config(tmp_path / "config.json")


def test_configs_saved_by_earlier_versions_load_without_their_retired_keys(tmp_path):
    """Data made before a key was retired (e.g. controller.curiosity, never read) must stay usable."""
    cfg = config.make_config("smoke")
    data = config.to_dict(cfg)
    for key in config.RETIRED_KEYS:
        section, field = key.split(".")
        data[section][field] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert config.load_config(tmp_path / "config.json") == cfg
    # Retired means gone: a user cannot set it any more.
    with pytest.raises(config.ConfigError, match="unknown config key 'controller.curiosity'"):
        config.make_config("smoke", {"controller.curiosity": 1.0})


def test_check_compatible_names_the_differences():
    a = config.make_config("smoke")
    b = config.make_config("smoke", {"vae.z_size": "16"})
    config.check_compatible(a, a, ["vae.z_size"], "V")
    with pytest.raises(config.ConfigError, match="vae.z_size: artifact has 32, current config has 16"):
        config.check_compatible(a, b, ["vae.z_size"], "V")


def test_script_reports_bad_set_without_traceback(tmp_path):
    proc = run_script("01_generate_data.py", "--set", "data.episodez=3", data_dir=tmp_path, check=False)
    assert proc.returncode == 2
    assert "unknown config key 'data.episodez'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_config_lists_every_field(tmp_path):
    proc = run_script("01_generate_data.py", "--help-config", data_dir=tmp_path)
    for key in config.valid_keys():
        assert key in proc.stdout


def test_help_config_shows_the_values_of_the_preset_and_sets(tmp_path):
    proc = run_script("01_generate_data.py", "--help-config", "--set", "data.seed=7", data_dir=tmp_path, preset="quick")
    quick = config.make_config("quick")
    assert "config of --preset quick --set data.seed=7:" in proc.stdout
    assert f"data.episodes = {quick.data.episodes!r}  (paper: {config.Config().data.episodes!r})" in proc.stdout
    assert "data.seed = 7  (paper: 0)" in proc.stdout
    assert f"vae.z_size = {quick.vae.z_size!r}\n" in proc.stdout  # the same as the paper's: no remark
