"""worldmodels/devices.py: TensorFlow's C++ log is quiet unless asked for; devices are reported one way."""

import os
import subprocess
import sys

from tests.conftest import REPO

CODE = "import worldmodels\nfrom worldmodels.devices import describe_devices\nprint(describe_devices())\n"


def run_with(env_changes, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "WORLDMODELS_VERBOSE")}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", CODE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_tensorflow_log_lines_are_hidden_unless_verbose():
    quiet = run_with({})
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith("devices: ")
    assert quiet.stderr == ""
    # The same import with the log asked for prints TensorFlow's lines (oneDNN, CUDA...), so the
    # quiet run above was quiet because of worldmodels, not because TensorFlow had nothing to say.
    for verbose in (run_with({"WORLDMODELS_VERBOSE": "1"}), run_with({}, "--verbose")):
        assert verbose.returncode == 0, verbose.stderr
        assert verbose.stdout == quiet.stdout
        assert any(line[:1] in "IWE" and ".cc:" in line for line in verbose.stderr.splitlines()), verbose.stderr


def test_devices_are_reported_by_describe_devices_only():
    # Stage 2 once listed TensorFlow's devices its own way; every stage now prints describe_devices().
    own_way = [str(path.relative_to(REPO)) for path in REPO.rglob("*.py")
               if "list_physical_devices()" in path.read_text(encoding="utf-8") and "tests" not in path.parts
               and path.name != "devices.py" and ".venv" not in path.parts]
    assert own_way == []
