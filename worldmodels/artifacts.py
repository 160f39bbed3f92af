"""Where each stage's artifacts live under ``--data-dir``, and loading them with checks.

A stage that consumes an artifact loads it through here, so that a missing artifact says
which command makes it, and an artifact made with an incompatible config is refused
before TensorFlow fails on a shape deep inside a model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import storage
from worldmodels.storage import CorruptFileError, MissingDataError, read_json

# --------------------------------------------------------------------------- folder and file names
# Every artifact's folder and file names are spelled here only; everything else uses these.

ROLLOUTS = "rollouts"
SERIES = "series"
# The folder and file of each V; which one is used is ``vae.model``.
VISION = {"vae": ("vae", "vae.keras"), "vae_gan": ("vae_gan", "vae_gan.keras")}
RNN = ("rnn", "rnn.keras")
CONTROLLER = "controller"
# Dream-trained controllers live beside the real-trained one, one folder per temperature.
DREAM_CONTROLLER_PREFIX = "controller_dream_t"
# A real-environment search started from another controller (controller.init_from): the hybrid.
HYBRID_CONTROLLER = "controller_hybrid"
CONTROLLER_FILE = "controller.npz"
# A controller's score on tracks episode_seed(base, i), i < count (evaluate_controller.py's default file,
# with its per-track .csv beside it), and the pattern that finds every such score in a folder.
EVALUATION_FILE = "evaluation_s{base}_n{count}.json"
EVALUATIONS = "evaluation_s*_n*.*"
# The iterative procedure (06_iterate.py): its folder and its table of one row per iteration.
ITERATIONS = "iterations"
ITERATIONS_TABLE = "iterations.csv"
# Which controller iteration 1 started from, recorded when it starts (``iterations_start_dir``).
ITERATIONS_START = "start.json"
TEMPERATURE_STUDY = "temperature_study"
# The seed study (study_seeds.py): one controller folder per CMA-ES seed under it, and its tables.
CONTROLLER_SEEDS = "controller_seeds"
COMPARE = "compare"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.json"

# The command that makes each folder (named in "make it first with" errors and by run_pipeline.py).
MAKERS = {
    ROLLOUTS: "01_generate_data.py",
    VISION["vae"][0]: "02_train_vae.py",
    VISION["vae_gan"][0]: "02_train_vae.py --set vae.model=vae_gan",
    SERIES: "03_generate_rnn_data.py",
    RNN[0]: "04_train_rnn.py",
    CONTROLLER: "05_train_controller.py",
}

# --------------------------------------------------------------------------- compatible keys
# The config fields that define an artifact: a stage refuses to extend or consume one made with
# other values of these.

# What defines a rollout folder: the episodes a command records.
ROLLOUT_KEYS = ("data.seed", "data.policy", "data.max_steps", "data.expert_noise", "data.controller",
                "data.controller_noise", "data.controller_steer_lapses", "data.controller_steer_lapse_steps")
# What else defines the episodes of the 'controller' policy (checked by stage 1 when data.policy has it): C's
# actions depend on what it sees of V and on how the frames are drawn.
CONTROLLER_ROLLOUT_KEYS = ("controller.z_input", "env.observation")
# What V's consumers depend on.
VISION_KEYS = ("vae.model", "vae.z_size")
# What defines V for stage 2 itself: a V folder made with other values is not continued.
VAE_KEYS = VISION_KEYS + ("vae.kl_tolerance",)
# What a series file's contents depend on: the V that encoded it and the rollouts it encoded.
SERIES_KEYS = VISION_KEYS + ROLLOUT_KEYS
# rnn.action_head adds a layer to M; configs saved before it existed load with its default (off), which is
# how those M were made.
RNN_KEYS = VISION_KEYS + ("rnn.hidden_units", "rnn.num_mixtures", "rnn.reward_head", "rnn.done_head",
                          "rnn.action_head")
# What defines a controller search: a controller folder made with other values is not continued.
CONTROLLER_KEYS = RNN_KEYS + (
    "controller.env", "controller.population", "controller.rollouts_per_member", "controller.sigma_init",
    "controller.weight_decay", "controller.max_steps", "controller.eval_episodes", "controller.seed",
    "controller.patience", "controller.racing", "controller.z_input", "env.observation", "controller.init_from",
)
# dream.start_every, .ensemble, .pessimism: configs saved before they existed load with their defaults (0, "", 0),
# which is how those searches dreamt.
DREAM_KEYS = ("dream.temperature", "dream.max_steps", "dream.skip_initial_frames", "dream.start_every",
              "dream.ensemble", "dream.pessimism")


def controller_keys(cfg: config.Config) -> tuple[str, ...]:
    """:data:`CONTROLLER_KEYS`, plus :data:`DREAM_KEYS` for a search in the dream."""
    return CONTROLLER_KEYS + (DREAM_KEYS if cfg.controller.env == "dream" else ())


# --------------------------------------------------------------------------- paths


def selected_generation(scalars: dict, which: str) -> int:
    """The generation the parameters ``which`` of a ``controller.npz`` come from.

    ``scalars`` maps the file's 0-d keys to values. ``params`` is the controller selected on the
    held-out tracks (``best_eval_generation``) when one was selected; ``mean`` and ``best_member``
    are the search's state at its last generation (``generation``), as are ``params`` before any
    held-out evaluation (``best_eval_generation`` is -1 then, or absent in older files).
    """
    selected = int(scalars.get("best_eval_generation", -1))
    return selected if which == "params" and selected >= 0 else int(scalars["generation"])


def rollouts_dir(data_dir: Path) -> Path:
    return Path(data_dir) / ROLLOUTS


def series_dir(data_dir: Path) -> Path:
    return Path(data_dir) / SERIES


def vision_dir(data_dir: Path, cfg: config.Config) -> Path:
    return Path(data_dir) / VISION[cfg.vae.model][0]


def vision_path(data_dir: Path, cfg: config.Config) -> Path:
    folder, name = VISION[cfg.vae.model]
    return Path(data_dir) / folder / name


def weights_path(model_path: Path) -> Path:
    """``vae.keras`` -> ``vae.weights.h5`` beside it (V saves both)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.replace(".keras", ".weights.h5"))


def rnn_dir(data_dir: Path) -> Path:
    return Path(data_dir) / RNN[0]


def rnn_path(data_dir: Path) -> Path:
    return Path(data_dir) / RNN[0] / RNN[1]


def dream_controller_dir(data_dir: Path, temperature: float) -> Path:
    """``<data>/controller_dream_t<tau:g>``: 1.15 -> ``t1.15``, 1.0 -> ``t1``."""
    return Path(data_dir) / f"{DREAM_CONTROLLER_PREFIX}{temperature:g}"


def initial_controller_dir(data_dir: Path, temperature: float) -> Path | None:
    """The folder whose ``controller.npz`` the iterative procedure starts from (its iteration 1 collects with it):
    ``controller/`` (real-trained), else ``controller_dream_t<temperature>``, else the first other dream folder
    by name; None if none holds a controller (the iterations then start from zeros)."""
    data_dir = Path(data_dir)
    others = sorted(data_dir.glob(f"{DREAM_CONTROLLER_PREFIX}*"))
    for folder in [data_dir / CONTROLLER, dream_controller_dir(data_dir, temperature), *others]:
        if (folder / CONTROLLER_FILE).is_file():
            return folder
    return None


def iterations_start_dir(data_dir: Path, temperature: float, record: bool = False) -> Path | None:
    """The folder the iterative procedure's iteration 1 started from, None for zeros.

    ``<data>/iterations/start.json`` keeps the choice of :func:`initial_controller_dir` made when
    iteration 1 first ran (written there if ``record``), so a controller trained later changes neither
    a resumed iteration 1 nor what the sample-efficiency figure counts; without the record (a folder
    of an older run, or a look before any iteration) the choice is made from the folders present now.
    """
    path = Path(data_dir) / ITERATIONS / ITERATIONS_START
    if path.is_file():
        name = read_json(path).get("controller")
        if not isinstance(name, str):
            raise CorruptFileError(f"{path} does not name the start controller's folder; delete it to choose again")
        return Path(data_dir) / name if name else None
    folder = initial_controller_dir(data_dir, temperature)
    if record:
        storage.atomic_write_json(path, {"controller": folder.name if folder else ""})
    return folder


def controller_dir(data_dir: Path, cfg: config.Config) -> Path:
    """``<data>/controller`` (real), ``<data>/controller_hybrid`` (real, from ``controller.init_from``) or
    ``<data>/controller_dream_t<tau:g>`` (dream)."""
    if cfg.controller.env == "dream":
        return dream_controller_dir(data_dir, cfg.dream.temperature)
    return Path(data_dir) / (HYBRID_CONTROLLER if cfg.controller.init_from else CONTROLLER)


def require_models(data_dir: Path, cfg: config.Config) -> None:
    """Fail at once, before any slow import, if V (of ``vae.model``) or M is missing, naming the command."""
    for path, folder in ((vision_path(data_dir, cfg), VISION[cfg.vae.model][0]), (rnn_path(data_dir), RNN[0])):
        if not path.exists():
            raise MissingDataError(f"no trained model at {path}; make it first with: python {MAKERS[folder]}")


def _check_artifact(path: Path, cfg: config.Config, keys, what: str, command: str) -> None:
    if not path.exists():
        raise MissingDataError(f"no {what} at {path}; make it first with: {command}")
    saved = path.parent / CONFIG_FILE
    if not saved.exists():
        raise MissingDataError(f"{what} at {path} has no config.json beside it; remake it with: {command}")
    config.check_compatible(config.load_config(saved), cfg, keys, f"{what} at {path}")


def load_vision(data_dir: Path, cfg: config.Config):
    """The trained V selected by ``vae.model`` (a model with ``encode``/``decode``)."""
    import keras

    import models.vae  # noqa: F401  (registers ConvVAE for deserialisation)

    if cfg.vae.model == "vae_gan":
        import vae_gan.model  # noqa: F401  (registers the VAE-GAN)
    path = vision_path(data_dir, cfg)
    _check_artifact(path, cfg, VISION_KEYS, f"V ({cfg.vae.model})", f"python {MAKERS[VISION[cfg.vae.model][0]]}")
    return keras.models.load_model(path, compile=False)


def load_rnn(data_dir: Path, cfg: config.Config):
    """The trained M (MDN-RNN)."""
    import keras

    import models.mdn_rnn  # noqa: F401  (registers MDNRNN for deserialisation)

    require_rnn(data_dir, cfg)
    return keras.models.load_model(rnn_path(data_dir), compile=False)


def folder_list(text: str) -> list[Path]:
    """The folders of a comma-separated list (``dream.ensemble``, ``--ensemble``); blanks and empty items dropped."""
    return [Path(item.strip()) for item in text.split(",") if item.strip()]


def require_rnn(data_dir: Path, cfg: config.Config) -> None:
    """A clear error unless ``<data_dir>/rnn/`` holds an M made with ``cfg``'s architecture (RNN_KEYS)."""
    _check_artifact(rnn_path(data_dir), cfg, RNN_KEYS, "M (MDN-RNN)", f"python {MAKERS[RNN[0]]}")


def controller_file(path) -> Path:
    """A stage-5 ``controller.npz`` named as itself or as the folder holding it (``controller_dream_t1/``, ...)."""
    path = Path(path)
    return path if path.suffix == ".npz" else path / CONTROLLER_FILE


def controller_models(path, cfg: config.Config, data_dir: Path | None = None) -> tuple[Path, Path]:
    """``(folder of V, folder of M)`` that the controller at ``path`` (a ``controller.npz`` or its folder) drives with.

    M is the one it was trained in: ``rnn/`` beside its folder (``<data>/controller`` -> ``<data>``, and
    ``<data>/iterations/iter_002/controller`` -> ``iter_002``, whose M was fine-tuned there), else ``data_dir``'s;
    V is the nearest one (of ``vae.model``) from M's folder up (an iteration's folder holds M but not V), else
    ``data_dir``'s. Neither found: a MissingDataError naming the command that makes it.
    """
    source = controller_file(path).absolute()
    beside = source.parent.parent
    fallback = [Path(data_dir).absolute()] if data_dir is not None else []
    models = next((folder for folder in [beside, *fallback] if rnn_path(folder).is_file()), None)
    start = beside if models is None else models
    vision = next((folder for folder in [start, *start.parents, *fallback] if vision_path(folder, cfg).is_file()),
                  None)
    if vision is None:  # V first, as stage 5 reports them (V is made before M)
        raise MissingDataError(f"no V ({vision_path(start, cfg).name}) in {start}, a folder above it"
                               + "".join(f" or {folder}" for folder in fallback)
                               + f", for the controller {source}; make it first with: "
                               f"python {MAKERS[VISION[cfg.vae.model][0]]}")
    if models is None:
        raise MissingDataError(f"no M for the controller {source}: neither {rnn_path(beside)}"
                               + "".join(f" nor {rnn_path(folder)}" for folder in fallback)
                               + f" exists; make it first with: python {MAKERS[RNN[0]]}")
    return vision, models


def _read_controller(path: Path, which: str | None) -> tuple[np.ndarray | None, dict]:
    """(parameters ``which`` or None, the 0-d scalars) of a ``controller.npz``; unreadable: CorruptFileError."""
    try:
        with np.load(path) as data:
            params = None if which is None else np.array(data[which], dtype=np.float64)
            return params, {key: data[key].item() for key in data.files if data[key].ndim == 0}
    except Exception as exc:  # zip, zlib and key errors all mean the file is unusable
        raise CorruptFileError(f"{path} is not a readable controller file ({type(exc).__name__}: {exc})") from exc


def controller_scalars(path: Path) -> dict:
    """The scalars of a ``controller.npz`` (``generation``, ``best_eval_generation``, ...), without its parameters."""
    return _read_controller(path, None)[1]


def load_controller(path: Path, which: str, z_size: int, hidden: int) -> tuple[np.ndarray, dict]:
    """Parameters ``which`` (N,) from a ``controller.npz`` of stage 5, and its scalars."""
    num_params = num_parameters(z_size, hidden)
    if not path.exists():
        raise MissingDataError(f"no controller at {path}; train one first with: python {MAKERS[CONTROLLER]}")
    params, info = _read_controller(path, which)
    if params.shape != (num_params,):
        raise config.ConfigError(f"{path} holds parameters of shape {params.shape}, but vae.z_size={z_size} and "
                                 f"rnn.hidden_units={hidden} need ({num_params},): use the config it was trained with")
    if not np.all(np.isfinite(params)):
        raise CorruptFileError(f"{path}: parameters {which!r} are not finite")
    return params, info
