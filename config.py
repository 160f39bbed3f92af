"""One configuration for the whole pipeline, readable top to bottom.

Every numbered script builds its :class:`Config` with :func:`parse_args`:

    python 02_train_vae.py --preset small --set vae.epochs=3 --data-dir /mnt/data

* Defaults are the paper's numbers (REFERENCE.md). A *preset* overrides a few of them; presets
  change data volume, epochs and generations, never a network shape.
* ``--set section.field=value`` overrides one field, parsed to the field's type. An unknown
  section or field, or a value of the wrong type, is a :class:`ConfigError` that lists the
  valid choices.
* The resolved config is written as ``config.json`` beside every artifact
  (:func:`save_config`), and a stage that consumes an artifact checks that the fields it
  depends on agree (:func:`check_compatible`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence


class ConfigError(ValueError):
    """A configuration value, key or preset is invalid; the message says what is allowed."""


# The two other user errors live here too, beside ConfigError, so that this module (the bottom of
# the import graph) can raise them; ``worldmodels.storage`` re-exports them under their usual names.
class CorruptFileError(ValueError):
    """A file exists but cannot be used: truncated, corrupt, or of the wrong layout."""


class MissingDataError(FileNotFoundError):
    """A folder or file that a stage needs does not exist or is empty."""


def _f(default, doc: str):
    """A dataclass field with a one-line docstring (shown by ``--help-config``)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class DataConfig:
    """Stage 1: rollouts of CarRacing-v3 by the exploration policies (``01_generate_data.py``)."""

    episodes: int = _f(10_000, "number of rollouts to record (paper: 10,000)")
    max_steps: int = _f(1000, "time limit of an episode in environment steps (CarRacing-v3 default: 1000)")
    policy: str = _f("brownian", "exploration policy, or a mix such as 'expert:0.5,brownian:0.5' (one policy per "
                                 "episode, chosen from (seed, episode)): 'brownian' (temporally correlated random "
                                 "actions), 'uniform', 'expert' (a noisy pure-pursuit driver), or 'controller' "
                                 "(the trained C of data.controller with V and M, plus correlated action noise)")
    expert_noise: float = _f(1.0, "noise scale of the 'expert' policy: steering and speed noise and lapses "
                                  "(0 = clean laps, 1 = default: leaves the road and recovers)")
    controller: str = _f("", "the 'controller' policy's controller: a folder of stage 5 or 06_iterate (or its "
                             "controller.npz), driven with the M beside it and the nearest V above; "
                             "'' = <data-dir>/controller")
    controller_noise: float = _f(0.1, "std of the temporally correlated noise added to the 'controller' policy's "
                                      "actions (as iterate.action_noise)")
    controller_steer_lapses: float = _f(0.0, "chance per step that the 'controller' policy's steering is replaced, "
                                             "for data.controller_steer_lapse_steps steps on average, by one "
                                             "uniform random steer held constant: what steering does, seen apart "
                                             "from the frames that make C steer (0 = off)")
    controller_steer_lapse_steps: float = _f(10.0, "mean length in steps of a steering lapse of the 'controller' "
                                                   "policy (a geometric draw, >= 1)")
    seed: int = _f(0, "base seed; episode i is reproducible from (seed, i)")
    workers: int = _f(0, "parallel worker processes; 0 means one per CPU core")
    backend: str = _f("process", "parallel backend: 'serial', 'process' (spawn) or 'ray'")
    compresslevel: int = _f(1, "zlib level of the episode .npz files (1 = fast, 9 = smallest)")


@dataclass(frozen=True)
class EnvConfig:
    """The real CarRacing-v3 environment, wherever a stage builds one (stage 1, stage 5, evaluation)."""

    observation: str = _f("stock", "how frames are drawn: 'stock' (gymnasium's drawing, shrunk) or 'fast' "
                                   "(drawn at 64x64 directly, ~5x the steps/s); reported scores always use 'stock'")


@dataclass(frozen=True)
class VAEConfig:
    """Stage 2: the convolutional VAE, V (``02_train_vae.py``)."""

    model: str = _f("vae", "which V to train and use downstream: 'vae' or 'vae_gan'")
    z_size: int = _f(32, "latent dimension (paper: 32)")
    kl_tolerance: float = _f(0.5, "free bits: KL floor of kl_tolerance * z_size nats per frame (0 disables)")
    learning_rate: float = _f(1e-4, "Adam learning rate")
    batch_size: int = _f(100, "frames per batch")
    epochs: int = _f(10, "passes over the training frames")
    heldout_fraction: float = _f(0.05, "fraction of episodes held out for validation (split by episode)")
    shuffle_buffer: int = _f(10_000, "frames in the shuffle buffer of the streaming pipeline")
    episodes_in_flight: int = _f(8, "episodes read in parallel and interleaved, so batches mix episodes")
    mixed_precision: bool = _f(False, "train in mixed_float16 (useful on a GPU only)")
    distribute: bool = _f(False, "train with tf.distribute.MirroredStrategy over all visible GPUs")
    seed: int = _f(0, "seed for initialisation and shuffling")
    split_seed: int = _f(0, "seed of the train / held-out episode split (V's and M's); independent of vae.seed, "
                            "so runs with other seeds are scored on the same held-out episodes")


@dataclass(frozen=True)
class VAEGANConfig:
    """The VAE-GAN variant of V (Larsen et al. 2016), used when ``vae.model='vae_gan'``."""

    gamma: float = _f(1e-2, "weight of the feature-wise reconstruction loss in the decoder's loss")
    adversarial: str = _f("gan", "discriminator objective: 'gan' (Larsen et al.) or 'wgan-gp' (Wasserstein, gradient penalty)")
    learning_rate: float = _f(3e-4, "RMSProp learning rate (authors' choice) for the 'gan' objective")
    gp_weight: float = _f(10.0, "gradient-penalty weight lambda for 'wgan-gp'")
    critic_steps: int = _f(5, "critic updates per generator update for 'wgan-gp'")
    pixel_weight: float = _f(1.0, "weight of V's pixel squared error added to the feature loss (0 = Larsen et al. exactly)")
    equilibrium_margin: float = _f(0.0, "skip D updates when D is this far ahead (authors' trick, 'gan' only; 0 disables)")
    epochs: int = _f(10, "passes over the training frames")


@dataclass(frozen=True)
class RNNConfig:
    """Stages 3-4: latent series and the MDN-RNN, M (``03_generate_rnn_data.py``, ``04_train_rnn.py``)."""

    hidden_units: int = _f(256, "LSTM units (paper: 256)")
    num_mixtures: int = _f(5, "Gaussian components per latent dimension (paper: 5)")
    sequence_length: int = _f(999, "steps per training sequence; shorter episodes are padded and masked")
    batch_size: int = _f(100, "sequences per batch")
    learning_rate: float = _f(1e-3, "initial Adam learning rate")
    min_learning_rate: float = _f(1e-5, "learning rate reached by the decay at the last step")
    grad_clip: float = _f(1.0, "gradient clipping by global norm")
    steps: int = _f(4000, "training steps (paper: 4000)")
    reward_head: bool = _f(True, "predict the reward (needed for a CarRacing dream)")
    done_head: bool = _f(True, "predict episode termination (needed for a CarRacing dream)")
    done_weight: float = _f(10.0, "weight of the done loss (paper's Doom model: 10)")
    action_head: bool = _f(False, "also predict the next action a_t+1 (the seed report's M models "
                                  "P(x, r, a, d | x, a, h)): an auxiliary target and a diagnostic; C still chooses "
                                  "the dream's actions")
    action_weight: float = _f(1.0, "weight of the action head's loss, the MSE of a_t+1 per action component")
    dropout: float = _f(0.0, "dropout on the LSTM output (Dropout's Dream Land uses 0.1)")
    scheduled_sampling: float = _f(0.0, "probability that an input z_t of M in training is its own draw from the "
                                        "step before instead of the real one (parallel scheduled sampling; "
                                        "lucid-dream-racer used 0.3): M learns from inputs like its dream's; "
                                        "costs a second forward pass per step")
    heldout_fraction: float = _f(0.05, "fraction of episodes held out for validation (same split as V)")
    encode_batch_size: int = _f(1000, "frames per V call when encoding rollouts into series")
    mixed_precision: bool = _f(False, "train the LSTM in mixed_float16 (useful on a GPU only; the MDN stays float32)")
    seed: int = _f(0, "seed for initialisation, batching and z re-sampling")


@dataclass(frozen=True)
class ControllerConfig:
    """Stage 5: the linear controller, C, evolved with CMA-ES (``05_train_controller.py``)."""

    env: str = _f("real", "where members are scored: 'real' CarRacing or the 'dream' of M")
    population: int = _f(64, "CMA-ES population size (paper: 64)")
    rollouts_per_member: int = _f(16, "episodes averaged into one member's fitness (paper: 16)")
    sigma_init: float = _f(0.1, "initial CMA-ES step size (paper: 0.1)")
    weight_decay: float = _f(0.0, "L2 penalty on the parameters subtracted from the fitness")
    generations: int = _f(1800, "CMA-ES generations (paper: ~1800)")
    max_steps: int = _f(1000, "time limit of a real episode")
    eval_every: int = _f(25, "evaluate the CMA mean every this many generations (paper: 25)")
    eval_episodes: int = _f(1024, "held-out tracks for the periodic evaluation (paper: 1024)")
    final_eval_episodes: int = _f(100, "held-out tracks for the reported score (paper: 100)")
    workers: int = _f(0, "environment worker processes; 0 means one per CPU core")
    backend: str = _f("process", "parallel backend: 'serial', 'process' (spawn) or 'ray'")
    ray_address: str = _f("", "address of a Ray cluster for backend 'ray' ('' starts a local one)")
    seed: int = _f(0, "seed of CMA-ES and of the training tracks")
    seeds: tuple[int, ...] = _f((0, 1, 2), "controller seeds of the seed study (study_seeds.py): one search per seed, "
                                           "all scored on the final tracks of controller.seed")
    patience: int = _f(0, "training episodes stop after this many steps without a new tile, the rest booked at "
                          "-0.1 a step (0 = never; evaluations always run in full)")
    racing: bool = _f(False, "every member drives a generation's first track, only the better half the others "
                             "(needs rollouts_per_member >= 2)")
    z_input: str = _f("sample", "what C and M see of V's posterior in the real env: 'sample' (paper's code) or 'mean'")
    init_from: str = _f("", "a controller folder (or its controller.npz), relative to the data dir, whose params start "
                            "a real-env search written to <data>/controller_hybrid ('' = start from zeros)")


@dataclass(frozen=True)
class DreamConfig:
    """The dream: CarRacing generated by M (``05_train_controller.py --env dream``)."""

    temperature: float = _f(1.15, "sampling temperature tau of M (paper's best Doom value: 1.15)")
    temperatures: tuple[float, ...] = _f((0.1, 0.5, 1.0, 1.15, 1.3), "temperatures of the temperature study")
    max_steps: int = _f(1000, "time limit of a dream episode")
    skip_initial_frames: int = _f(50, "real frames skipped before taking a starting z (CarRacing's zoom-in)")
    batch_size: int = _f(1024, "dream agents stepped together in one model call")
    start_every: int = _f(0, "0: each dream starts at frame skip_initial_frames of a series; k > 0: at any of the "
                             "frames skip_initial_frames, +k, +2k, ... of every series, M in the state it reaches "
                             "there on the real frames (short dreams branched from real states, MBPO: use with "
                             "dream.max_steps ~100-200)")
    ensemble: str = _f("", "comma-separated folders holding rnn/ of further Ms (trained like M from other seeds) "
                           "whose disagreement with M the dream measures every step; empty: none")
    pessimism: float = _f(0.0, "lambda: each dream step pays M's reward minus lambda x the Ms' disagreement on "
                               "z_t+1 (RMS over latent dimensions of the std across Ms; MOPO); 0: M's reward")


@dataclass(frozen=True)
class IterateConfig:
    """The iterative procedure of the seed report: collect with C, refit M, retrain C in the dream (``06_iterate.py``)."""

    iterations: int = _f(10, "iterations to run (a larger value continues a finished run)")
    episodes: int = _f(64, "real episodes collected per iteration with the current controller plus noise")
    action_noise: float = _f(0.1, "std of the temporally correlated noise added to the controller's actions while collecting")
    steer_lapses: float = _f(0.0, "chance per step of a steering lapse while collecting (as "
                                  "data.controller_steer_lapses; 0 = off)")
    steer_lapse_steps: float = _f(10.0, "mean length in steps of a steering lapse while collecting")
    rnn_steps: int = _f(1000, "training steps of each iteration's fine-tune of M on all data so far")
    generations: int = _f(200, "CMA-ES generations in the dream per iteration, starting from the previous controller")
    eval_episodes: int = _f(100, "held-out real tracks on which each iteration's controller is scored")
    seed: int = _f(0, "seed of the collection tracks and the action noise of every iteration")
    curiosity_variants: int = _f(0, "noisy variants of the controller (step controller.sigma_init) that, with it, each "
                                    "drive one short real episode before the collection; the fittest by return + "
                                    "iterate.curiosity x M's NLL collects (0 = off: the controller collects)")
    curiosity: float = _f(0.0, "beta: weight of M's surprise, its NLL of each observed transition z_t -> z_t+1 "
                               "(nats per latent dimension), added to the real reward of the variants' episodes "
                               "(0 = the variants are chosen by real return alone)")
    curiosity_steps: int = _f(200, "steps of each variant's scoring episode (at most data.max_steps)")
    repair_episodes: int = _f(0, "windows of largest dream-vs-real disagreement added to each iteration's data: C's "
                                 "dream actions from a real state replayed in the real env (0 = off)")
    repair_candidates: int = _f(16, "starts (episode, frame) of the newest episodes dreamed and replayed per "
                                    "iteration, of which the iterate.repair_episodes most disagreeing are kept")
    repair_horizon: int = _f(50, "steps C drives in the dream from each repair start, then replayed in reality")


@dataclass(frozen=True)
class Config:
    """The whole pipeline's configuration; ``preset`` records which preset it started from."""

    preset: str = _f("paper", "name of the preset the values started from")
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    vae_gan: VAEGANConfig = field(default_factory=VAEGANConfig)
    rnn: RNNConfig = field(default_factory=RNNConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    dream: DreamConfig = field(default_factory=DreamConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)


SECTIONS = ("data", "env", "vae", "vae_gan", "rnn", "controller", "dream", "iterate")

# Presets override data volume, epochs and generations only; the networks are always the paper's.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's numbers are the defaults.
    "paper": {},
    # The seed report's scale: 2000 rollouts.
    "report": {
        "data.episodes": 2000,
        "rnn.steps": 4000,
        "controller.generations": 300,
    },
    # A 2-core CPU box finishes the whole pipeline in a few hours.
    "small": {
        "data.episodes": 200,
        "vae.epochs": 3,
        "vae_gan.epochs": 3,
        "rnn.steps": 1000,
        "rnn.batch_size": 16,
        "controller.population": 16,
        "controller.rollouts_per_member": 2,
        "controller.generations": 20,
        "controller.eval_every": 5,
        "controller.eval_episodes": 16,
        "controller.final_eval_episodes": 100,
        "dream.batch_size": 512,
    },
    # Default of the README's one-line run: the whole pipeline on 2 CPU cores in 15-34 minutes (README).
    "quick": {
        "data.episodes": 32,
        "data.max_steps": 500,
        "vae.epochs": 4,
        "vae_gan.epochs": 4,
        "rnn.sequence_length": 499,
        "rnn.steps": 300,
        "rnn.batch_size": 8,
        "controller.population": 8,
        "controller.rollouts_per_member": 2,
        "controller.generations": 6,
        "controller.max_steps": 500,
        "controller.eval_every": 3,
        "controller.eval_episodes": 8,
        "controller.final_eval_episodes": 16,
        "dream.max_steps": 500,
        "dream.batch_size": 64,
    },
    # The long controller search on a 2-core CPU machine (issue 18): lucid-dream-racer's search
    # (population 32 x 4 tracks, a stop after 200 steps without a tile, racing) with training
    # episodes drawn by the fast renderer (held-out and final scores always on stock pixels).
    # Data, V and M are the `small` preset's: on them a 20-generation search on the VAE-GAN scored
    # 657 +- 108 (README), so the search, not V or M, is what this preset spends its hours on, and
    # a `small` data dir can be reused as it is. Meant to be run for many hours and resumed.
    "cpu": {
        "data.episodes": 200,
        "vae.epochs": 3,
        "vae_gan.epochs": 3,
        "rnn.steps": 1000,
        "rnn.batch_size": 16,
        "env.observation": "fast",
        "controller.population": 32,
        "controller.rollouts_per_member": 4,
        "controller.generations": 400,
        "controller.patience": 200,
        "controller.racing": True,
        "controller.eval_every": 10,
        "controller.eval_episodes": 32,
        "controller.final_eval_episodes": 100,
        "dream.batch_size": 512,
    },
    # Tests: a few short episodes and tiny epochs, so the full pipeline runs in seconds to minutes.
    "smoke": {
        "data.episodes": 3,
        "data.max_steps": 60,
        "data.workers": 1,
        "vae.epochs": 1,
        "vae.batch_size": 16,
        "vae.heldout_fraction": 0.34,
        "vae.shuffle_buffer": 256,
        "vae_gan.epochs": 1,
        "rnn.sequence_length": 59,
        "rnn.steps": 4,
        "rnn.batch_size": 2,
        "rnn.heldout_fraction": 0.34,
        "rnn.encode_batch_size": 64,
        "controller.population": 4,
        "controller.rollouts_per_member": 1,
        "controller.generations": 2,
        "controller.max_steps": 60,
        "controller.eval_every": 1,
        "controller.eval_episodes": 2,
        "controller.final_eval_episodes": 2,
        "controller.workers": 1,
        "dream.max_steps": 60,
        "dream.skip_initial_frames": 5,
        "dream.batch_size": 8,
        "iterate.iterations": 2,
        "iterate.episodes": 2,
        "iterate.rnn_steps": 2,
        "iterate.generations": 2,
        "iterate.eval_episodes": 2,
    },
}

DEFAULT_PRESET = "paper"


# --------------------------------------------------------------------------- parsing values


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def _parse_value(text: str, annotation) -> Any:
    """Parse ``text`` to the type of a field annotation (int, float, bool, str, tuple[float, ...])."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        items = [t for t in text.replace(" ", "").strip("()[]").split(",") if t]
        return tuple(_parse_value(t, item_type) for t in items)
    if annotation is bool:
        return _parse_bool(text)
    if annotation is int:
        # Accept "10_000" and "1e3" as a user would type them, but not "2.5".
        value = float(text.replace("_", ""))
        if not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    if annotation is float:
        return float(text)
    if annotation is str:
        return text
    raise TypeError(f"unsupported config type {annotation!r}")


def _coerce(value: Any, annotation, where: str) -> Any:
    """Check (and gently convert) a Python value against a field type, e.g. from a preset or JSON."""
    try:
        if isinstance(value, str) and annotation is not str:
            return _parse_value(value, annotation)
        if typing.get_origin(annotation) is tuple:
            (item_type, _) = typing.get_args(annotation)
            return tuple(_coerce(v, item_type, where) for v in value)
        if annotation is bool:
            if not isinstance(value, bool):
                raise ValueError("expected true/false")
            return value
        if annotation is int:
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if annotation is str:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value {value!r} for {where} ({_type_name(annotation)}): {exc}") from None
    raise ConfigError(f"unsupported type for {where}")


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"comma-separated list of {typing.get_args(annotation)[0].__name__}"
    return annotation.__name__


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# --------------------------------------------------------------------------- validation

# Fields whose value must be one of a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.backend": ("serial", "process", "ray"),
    "env.observation": ("stock", "fast"),
    "vae.model": ("vae", "vae_gan"),
    "vae_gan.adversarial": ("gan", "wgan-gp"),
    "controller.env": ("real", "dream"),
    "controller.z_input": ("sample", "mean"),
    "controller.backend": ("serial", "process", "ray"),
}


# The policies of stage 1 (``worldmodels.policies.POLICIES`` builds all but ``controller``, which
# ``worldmodels.recording`` drives; a test keeps them in step).
POLICY_NAMES = ("brownian", "uniform", "expert", "controller")


def parse_policy_mix(spec: str) -> tuple[tuple[str, float], ...]:
    """``data.policy`` as ``((name, fraction), ...)``: 'expert' -> (('expert', 1.0),).

    A mix is comma-separated ``name:fraction`` items, each name once, fractions in (0, 1]
    summing to 1.
    """
    items = [item.strip() for item in spec.split(",")]
    if len(items) == 1 and ":" not in items[0]:
        items = [f"{items[0]}:1"]
    mix = []
    for item in items:
        name, colon, fraction = item.partition(":")
        name = name.strip()
        if name not in POLICY_NAMES:
            raise ConfigError(f"data.policy={spec!r}: unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}, "
                              "or mix them as e.g. 'expert:0.5,brownian:0.5'")
        try:
            value = float(fraction) if colon else float("nan")
        except ValueError:
            value = float("nan")
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"data.policy={spec!r}: {item!r} needs a fraction in (0, 1] after the colon, "
                              "as in 'expert:0.5,brownian:0.5'")
        mix.append((name, value))
    names = [name for name, _ in mix]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.policy={spec!r} names a policy twice")
    total = sum(value for _, value in mix)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"data.policy={spec!r}: the fractions sum to {total:g}, not 1")
    return tuple(mix)


def _validate(cfg: Config) -> None:
    """Reject values that parse but make no sense, with a message that says what is allowed."""
    parse_policy_mix(cfg.data.policy)
    for key, choices in CHOICES.items():
        value = get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    positive = [
        "data.episodes", "data.max_steps", "vae.z_size", "vae.batch_size", "vae.epochs",
        "vae.shuffle_buffer", "vae.episodes_in_flight", "vae_gan.epochs", "vae_gan.critic_steps",
        "rnn.hidden_units", "rnn.num_mixtures", "rnn.sequence_length", "rnn.batch_size", "rnn.steps",
        "rnn.encode_batch_size", "controller.population", "controller.rollouts_per_member",
        "controller.generations", "controller.max_steps", "controller.eval_every",
        "controller.eval_episodes", "controller.final_eval_episodes", "dream.max_steps",
        "dream.batch_size", "iterate.iterations", "iterate.episodes", "iterate.rnn_steps", "iterate.generations",
        "iterate.eval_episodes", "iterate.curiosity_steps", "iterate.repair_candidates", "iterate.repair_horizon",
    ]
    for key in positive:
        if get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {get(cfg, key)}")
    non_negative = [
        "data.workers", "data.expert_noise", "data.controller_noise", "controller.workers", "vae.kl_tolerance", "controller.weight_decay",
        "dream.skip_initial_frames", "dream.start_every", "dream.pessimism", "rnn.dropout", "vae_gan.pixel_weight",
        "vae_gan.equilibrium_margin", "controller.patience", "iterate.action_noise", "iterate.seed",
        "iterate.curiosity_variants", "iterate.curiosity", "iterate.repair_episodes",
    ]
    for key in non_negative:
        if get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(cfg, key)}")
    if cfg.dream.pessimism > 0 and not cfg.dream.ensemble.strip():
        raise ConfigError("dream.pessimism pays less where Ms disagree: give the further Ms' folders in dream.ensemble")
    for key in ("vae.heldout_fraction", "rnn.heldout_fraction"):
        if not 0.0 <= get(cfg, key) < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {get(cfg, key)}")
    if not 1 <= cfg.data.compresslevel <= 9:
        raise ConfigError(f"data.compresslevel must be in 1..9, got {cfg.data.compresslevel}")
    if not 0.0 <= cfg.rnn.dropout < 1.0:
        raise ConfigError(f"rnn.dropout must be in [0, 1), got {cfg.rnn.dropout}")
    for chance, steps in (("data.controller_steer_lapses", "data.controller_steer_lapse_steps"),
                          ("iterate.steer_lapses", "iterate.steer_lapse_steps")):
        if not 0.0 <= get(cfg, chance) < 1.0:
            raise ConfigError(f"{chance} must be a chance per step in [0, 1), got {get(cfg, chance)}")
        if not get(cfg, steps) >= 1.0:
            raise ConfigError(f"{steps} must be >= 1 (a mean length in steps), got {get(cfg, steps)}")
    if not 0.0 <= cfg.rnn.scheduled_sampling <= 1.0:
        raise ConfigError(f"rnn.scheduled_sampling must be a probability in [0, 1], got {cfg.rnn.scheduled_sampling}")
    if cfg.controller.population < 2:
        raise ConfigError("controller.population must be at least 2 for CMA-ES")
    if cfg.controller.racing and cfg.controller.rollouts_per_member < 2:
        raise ConfigError("controller.racing needs controller.rollouts_per_member >= 2 (it halves the population "
                          "after the first track)")
    if cfg.iterate.curiosity > 0 and cfg.iterate.curiosity_variants == 0:
        raise ConfigError("iterate.curiosity weighs M's surprise in the choice among iterate.curiosity_variants "
                          "variants of the controller; set iterate.curiosity_variants > 0 too")
    if cfg.controller.init_from and cfg.controller.env != "real":
        raise ConfigError("controller.init_from starts a search in the real environment from another controller "
                          "(the hybrid); it needs controller.env=real")
    if cfg.iterate.repair_episodes > cfg.iterate.repair_candidates:
        raise ConfigError(f"iterate.repair_episodes ({cfg.iterate.repair_episodes}) are chosen among "
                          f"iterate.repair_candidates ({cfg.iterate.repair_candidates}); set at least as many candidates")
    seeds = cfg.controller.seeds
    if any(not 0 <= k < 2**32 for k in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"controller.seeds must be distinct integers in [0, 2**32), got {seeds}")
    temps = (cfg.dream.temperature, *cfg.dream.temperatures)
    if any(t <= 0 for t in temps):
        raise ConfigError(f"dream temperatures must be > 0, got {temps}")


# --------------------------------------------------------------------------- building configs


def get(cfg: Config, key: str) -> Any:
    """Value of ``"section.field"`` (or a top-level field such as ``"preset"``)."""
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def valid_keys() -> list[str]:
    """Every ``section.field`` that ``--set`` accepts."""
    keys = []
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        keys += [f"{section}.{name}" for name in _field_types(cls)]
    return keys


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with ``{"section.field": value}`` applied and validated.

    Values may be strings (from the command line) or Python values (from presets and JSON).
    """
    updates: dict[str, dict[str, Any]] = {}
    for key, raw in overrides.items():
        section, dot, name = key.partition(".")
        if not dot or section not in SECTIONS:
            raise ConfigError(
                f"unknown config key {key!r}: keys look like section.field with section one of "
                f"{', '.join(SECTIONS)}"
            )
        types = _field_types(type(getattr(cfg, section)))
        if name not in types:
            raise ConfigError(
                f"unknown config key {key!r}; valid fields of {section!r}: {', '.join(types)}"
            )
        updates.setdefault(section, {})[name] = _coerce(raw, types[name], key)
    new = dataclasses.replace(
        cfg, **{s: dataclasses.replace(getattr(cfg, s), **fields) for s, fields in updates.items()}
    )
    _validate(new)
    return new


def make_config(preset: str = DEFAULT_PRESET, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset, then explicit overrides (later wins)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = apply_overrides(Config(preset=preset), PRESETS[preset])
    return apply_overrides(cfg, overrides or {})


def parse_set_arguments(items: Iterable[str]) -> dict[str, str]:
    """``["vae.epochs=3", ...]`` -> ``{"vae.epochs": "3"}``, rejecting items without ``=``."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# Keys that earlier versions saved and this one no longer has, each with the reason. A config.json
# beside old data still loads: these keys are dropped (they never changed a result), any other
# unknown key is an error.
RETIRED_KEYS = {
    "controller.curiosity": "declared but never read by any stage (the curiosity bonus is not built)",
}


# Keys added later whose default is not what older artifacts were made with: a saved config that
# lacks one gets the value that reproduces how the artifact was made, not today's default.
LEGACY_VALUES = {
    "controller.z_input": "mean",  # controllers before z_input was a choice were fed V's posterior mean
}


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved by :func:`save_config`; unknown keys are an error (retired ones are dropped),
    missing ones default (those of :data:`LEGACY_VALUES` to their old value)."""
    if not isinstance(data, dict):
        raise ConfigError("a saved config must be a JSON object")
    overrides = {}
    for section, values in data.items():
        if section == "preset":
            continue
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"unknown config section {section!r} in saved config")
        overrides.update({f"{section}.{k}": v for k, v in values.items() if f"{section}.{k}" not in RETIRED_KEYS})
    for key, value in LEGACY_VALUES.items():
        section, _, name = key.partition(".")
        if isinstance(data.get(section), dict) and name not in data[section]:
            overrides[key] = value
    cfg = Config(preset=str(data.get("preset", DEFAULT_PRESET)))
    return apply_overrides(cfg, overrides)


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file, raising :class:`MissingDataError` / :class:`CorruptFileError` with its name."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc})") from exc


def _replace_with_text(path: Path, text: str) -> Path:
    """Put ``text`` in ``path`` through a ``.<name>.<pid>.tmp`` file and ``os.replace``, so a crash never
    leaves half a config (``storage.remove_stale_temporaries`` deletes a leftover temporary)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_config(cfg: Config, folder: str | os.PathLike, name: str = "config.json") -> Path:
    """Write the resolved config as JSON beside an artifact (atomically; the layout of ``storage.atomic_write_json``)."""
    path = Path(folder) / name
    # A rerun with the same config leaves the file untouched, so "nothing redone" holds for it too.
    if path.is_file():
        try:
            if from_dict(read_json(path)) == cfg:
                return path
        except (ConfigError, ValueError):
            pass  # unreadable or stale: rewrite it
    return _replace_with_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_config(path: str | os.PathLike) -> Config:
    """Read a config written by :func:`save_config`."""
    try:
        return from_dict(read_json(Path(path)))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def check_compatible(saved: Config, current: Config, keys: Sequence[str], artifact: str) -> None:
    """Refuse to consume an artifact whose config differs from ours in ``keys``.

    For example M trained on 32-d latents cannot read a V with ``z_size=64``; mixing them
    would fail deep inside TensorFlow with a shape error, or worse, silently.
    """
    diffs = [f"{k}: artifact has {get(saved, k)!r}, current config has {get(current, k)!r}"
             for k in keys if get(saved, k) != get(current, k)]
    if diffs:
        raise ConfigError(
            f"{artifact} was made with an incompatible config ({'; '.join(diffs)}). "
            "Use the same --preset/--set as when it was made, or delete it to remake it."
        )


def describe(cfg: Config | None = None, heading: str = "") -> str:
    """Every field with its value in ``cfg`` (default: the paper's) and its docstring, for ``--help-config``.

    A value that differs from the paper's default says so, e.g. ``data.episodes = 40  (paper: 10000)``.
    """
    cfg = cfg or Config()
    lines = [heading] if heading else []
    for section in SECTIONS:
        cls = type(getattr(cfg, section))
        lines.append(f"[{section}] {cls.__doc__}")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, section), f.name)
            paper = "" if value == f.default else f"  (paper: {f.default!r})"
            lines.append(f"  {section}.{f.name} = {value!r}{paper}\n      {f.metadata.get('doc', '')}")
    lines.append("presets: " + ", ".join(f"{name} ({len(o)} overrides)" for name, o in PRESETS.items()))
    return "\n".join(lines)


def help_config(preset: str, overrides: Sequence[str]) -> str:
    """The text of ``--help-config``: every field with its value under ``preset`` and the ``--set`` overrides."""
    cfg = make_config(preset, parse_set_arguments(overrides))
    sets = "".join(f" --set {item}" for item in overrides)
    return describe(cfg, f"config of --preset {preset}{sets}:")


# --------------------------------------------------------------------------- command line


def make_parser(description: str, default_preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """The argument parser shared by every numbered script; scripts may add their own flags."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"starting values (default: {default_preset})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field; repeatable (see --help-config)")
    parser.add_argument("--data-dir", default=os.environ.get("WORLDMODELS_DATA", "data"), type=Path,
                        help="folder of all inputs and outputs (default: data, or $WORLDMODELS_DATA)")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config field with its value under --preset and --set, and exit")
    # Read by worldmodels/__init__.py before TensorFlow loads; declared here so that it parses.
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's C++ log lines (also: WORLDMODELS_VERBOSE=1)")
    return parser


def parse_args(
    description: str, argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None,
    default_preset: str = DEFAULT_PRESET,
) -> tuple[Config, argparse.Namespace]:
    """Parse the command line into ``(config, args)``; config errors exit with status 2 and a clear message."""
    parser = parser or make_parser(description, default_preset)
    args = parser.parse_args(argv)
    try:
        if args.help_config:
            print(help_config(args.preset, args.overrides))
            parser.exit(0)
        cfg = make_config(args.preset, parse_set_arguments(args.overrides))
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg, args


if __name__ == "__main__":
    print(describe())
    print(json.dumps(to_dict(make_config()), indent=2))
