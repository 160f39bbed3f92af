"""Scoring a saved controller on held-out tracks, and recording it: the library of ``evaluate_controller.py``.

``artifacts.load_controller`` reads one parameter vector of a ``controller.npz``;
:func:`evaluate_params` scores it with V and M on the tracks given (evaluate_controller.py: the final-evaluation
stream, never used for training or for picking the controller), full episodes on gymnasium's
stock pixels unless ``env.observation`` says otherwise;
:func:`write_track_csv` records one row per track; :func:`replay_frames` and :func:`write_video` replay
an evaluated episode at full resolution into a ``.gif`` (or ``.mp4`` with ``imageio[ffmpeg]``).
``worldmodels.figures`` uses the same functions for README's driving animation.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import config
from worldmodels import artifacts, envpool, rollout, storage
from worldmodels.driving import PROFILE_FIELDS

# TensorFlow is imported when V and M are loaded (load_agent), after the checks: a missing file is reported at once.

WHICH = ("params", "mean", "best_member")
VIDEO_FPS = 50  # CarRacing's simulation rate


def video_writer_check(path: Path) -> None:
    """Fail before any work if the video cannot be written."""
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise config.ConfigError(f"--video must end in .gif or .mp4, got {path}")
    if suffix == ".mp4":
        try:
            import imageio.v2  # noqa: F401
        except ImportError:
            raise config.ConfigError("an .mp4 video needs imageio with ffmpeg: pip install 'imageio[ffmpeg]' "
                                     "(or write a .gif)") from None


def replay_frames(seed: int, actions: np.ndarray, max_steps: int, result: dict):
    """Yield full-resolution RGB frames (400, 600, 3) of CarRacing replaying ``actions`` (T, 3) on track ``seed``.

    The pool's episodes are deterministic given the seed and actions, so this replay is the
    evaluated episode; ``result["return"]`` holds its return afterwards, for a check.
    """
    from worldmodels.env import make_env

    env = make_env(max_steps, render_mode="rgb_array")
    total = 0.0
    try:
        env.reset(seed=int(seed))
        yield env.render()
        for action in actions:
            _, reward, terminated, truncated, _ = env.step(action)
            total += reward
            yield env.render()
            if terminated or truncated:
                break
    finally:
        env.close()
        result["return"] = total


def write_video(frames, path: Path, fps: int = VIDEO_FPS) -> int:
    """Write RGB frames to ``path`` (.gif or .mp4) atomically; returns the number of frames.

    imageio streams frames to disk when it is installed. Otherwise a .gif is written with
    Pillow (what matplotlib's PillowWriter uses too), keeping each frame as a 1-byte
    palette image, a third of the memory of the RGB frame.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        import imageio.v2 as imageio
    except ImportError:
        imageio = None
    count = 0
    if imageio is not None:
        def write(f):
            nonlocal count
            kwargs = {"duration": 1000 / fps, "loop": 0} if suffix == ".gif" else {"fps": fps}
            with imageio.get_writer(f, format=suffix[1:], **kwargs) as writer:
                for frame in frames:
                    writer.append_data(frame)
                    count += 1
        storage.atomic_write(path, write)
        return count
    from PIL import Image

    images = [Image.fromarray(frame).quantize(colors=256, method=Image.Quantize.MEDIANCUT) for frame in frames]
    if not images:
        raise ValueError("no frames to write")

    def write_gif(f):
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)

    storage.atomic_write(path, write_gif)
    return len(images)


def write_track_csv(path: Path, metrics: dict) -> None:
    """One row per track: index, seed, return, steps, and :data:`PROFILE_FIELDS` if profiled (atomically)."""
    profiles = metrics.get("profile", {}).get("tracks_profile")
    header = "track,seed,return,steps" + ("," + ",".join(PROFILE_FIELDS) if profiles else "")
    rows = [header]
    for i, (seed, score, steps) in enumerate(zip(metrics["seeds"], metrics["scores"], metrics["lengths"])):
        extra = "".join("," + ("" if profiles[i][key] is None else repr(profiles[i][key])) for key in PROFILE_FIELDS) \
            if profiles else ""
        rows.append(f"{i},{seed},{score!r},{steps}{extra}")
    storage.atomic_write_text(path, "\n".join(rows) + "\n")


@contextlib.contextmanager
def real_world(cfg, vae, rnn, num_envs: int):
    """A RealWorld on a fresh pool of ``num_envs`` CarRacing envs drawing ``cfg.env.observation``, as
    ``cfg.controller`` says (closed after)."""
    c = cfg.controller
    with envpool.CarRacingPool(num_envs, c.max_steps, c.backend, c.workers, c.ray_address,
                               observation=cfg.env.observation) as pool:
        yield rollout.RealWorld(pool, vae, rnn, c.z_input)


def evaluate_params(cfg, vae, rnn, params: np.ndarray, seeds: np.ndarray, max_concurrent: int,
                    record_actions: bool, checkpoint=None) -> dict:
    """Run ``params`` (N,) with V and M on tracks ``seeds`` (E,), full episodes; rollout.evaluate's dict
    (resumable with ``checkpoint``, a file: rollout.run_episodes)."""
    with real_world(cfg, vae, rnn, min(len(seeds), max_concurrent)) as world:
        return rollout.evaluate(world, params, seeds, cfg.controller.max_steps, max_concurrent, record_actions,
                                progress="held-out tracks", checkpoint=checkpoint)


def final_tracks_base(cfg) -> int:
    """The base B of the final-evaluation stream of ``cfg``: track i is ``episode_seed(B, i)`` (``metrics.json``'s tracks)."""
    return rollout.FINAL_EVAL_SEED_OFFSET + cfg.controller.seed


def evaluation_path(folder: Path, base: int, episodes: int) -> Path:
    """``<folder>/evaluation_s<base>_n<episodes>.json``, where ``evaluate_controller.py`` writes a score by default."""
    return Path(folder) / artifacts.EVALUATION_FILE.format(base=base, count=episodes)


def score_on_tracks(cfg, vae, rnn, params: np.ndarray, base: int, episodes: int, max_concurrent: int,
                    record_actions: bool = False, checkpoint=None) -> dict:
    """``params`` (N,) on tracks ``episode_seed(base, i)``, i < ``episodes``, full episodes: :func:`evaluate_params`'
    dict plus ``metrics.summarise`` (mean, std, sem, IQM with its bootstrap interval) and the settings used.
    With ``checkpoint`` (a file) a killed scoring resumes at its first unfinished wave."""
    from worldmodels.metrics import summarise

    c = cfg.controller
    metrics = evaluate_params(cfg, vae, rnn, params, rollout.heldout_seeds(base, episodes, offset=0), max_concurrent,
                              record_actions, checkpoint)
    metrics.update(summarise(metrics["scores"]))
    metrics.update(episodes=episodes, track_seed=base, seed_stream=f"episode_seed({base}, i)", max_steps=c.max_steps,
                   z_input=c.z_input, observation=cfg.env.observation, preset=cfg.preset)
    return metrics


def resolve_config(folder: Path, preset: str | None, set_arguments) -> config.Config:
    """The config of the controller in ``folder``: its saved ``config.json`` with the explicit ``--set``
    arguments applied (each change a warning on stderr) and ``env.observation`` back to 'stock' unless set.

    An explicit ``preset`` (None: not given) that differs from the saved one is a ConfigError.
    With no saved config: ``preset`` (or the default) and the ``--set`` arguments, also on stock
    pixels unless ``--set env.observation=...``.
    """
    overrides = config.parse_set_arguments(set_arguments)
    saved_path = folder / artifacts.CONFIG_FILE
    if not saved_path.exists():
        # A preset may name the fast observation (e.g. `cpu`, for its search); a score is still
        # measured on stock pixels unless --set asks otherwise, as for a saved config below.
        return config.make_config(preset or config.DEFAULT_PRESET, {"env.observation": "stock", **overrides})
    saved = config.load_config(saved_path)
    if preset is not None and preset != saved.preset:
        raise config.ConfigError(f"--preset {preset} disagrees with {saved_path} (preset {saved.preset}); "
                                 "the controller's own config is used: drop --preset")
    # Scores are measured on gymnasium's stock pixels whatever the search trained on (the saved
    # env.observation of a fast-trained controller is 'fast'); only an explicit --set asks otherwise.
    cfg = config.apply_overrides(config.apply_overrides(saved, {"env.observation": "stock"}), overrides)
    changed = [f"{key}={config.get(cfg, key)!r} (trained with {config.get(saved, key)!r})" for key in overrides
               if config.get(cfg, key) != config.get(saved, key)]
    if changed:
        print(f"[eval] warning: evaluating with settings other than the controller's: {', '.join(changed)}",
              file=sys.stderr)
    return cfg


@dataclass(frozen=True)
class Agent:
    """A controller ready to score: its config, V, M, parameters (N,), and where it came from."""

    cfg: config.Config
    vae: object
    rnn: object
    params: np.ndarray
    description: str
    folder: Path
    generation: int | None


def load_agent(data_dir: Path, preset: str | None, set_arguments, *, pretrained_name: str | None = None,
               controller_path: Path | None = None, which: str = "params", replace_metrics: bool = False) -> Agent:
    """The agent of ``pretrained/<pretrained_name>/`` (SHA-256 checked) or the controller ``which`` of
    ``controller_path`` (a controller.npz or its folder; default ``<data_dir>/controller/``) with the V and M
    it was trained with (:func:`artifacts.controller_models`: an iteration's controller drives with its
    iteration's M; a controller with no M beside its folder, with ``data_dir``'s).

    ``replace_metrics``: the score will replace the controller folder's ``metrics.json``, which is
    only allowed on the stock observation (a ConfigError otherwise, before any slow work).
    """
    if pretrained_name:
        from worldmodels import pretrained

        _, vae, rnn, params, info = pretrained.load(pretrained_name)
        where = pretrained.folder(pretrained_name)
        return Agent(resolve_config(where, preset, set_arguments), vae, rnn, params, f"pretrained agent {where}",
                     where, info["generation"])
    path = artifacts.controller_file(controller_path or Path(data_dir) / artifacts.CONTROLLER)
    cfg = resolve_config(path.parent, preset, set_arguments)
    if cfg.env.observation != "stock" and replace_metrics:
        raise config.ConfigError(f"{path.parent / artifacts.METRICS_FILE} holds the reported score, always measured "
                                 f"on the stock observation; write a score on env.observation={cfg.env.observation} "
                                 "elsewhere (drop --replace-metrics, or --output PATH)")
    envpool.check_backend(cfg.controller.backend)  # e.g. Ray not installed: say so before any slow work
    vision_dir, models_dir = artifacts.controller_models(path, cfg, data_dir)
    params, info = artifacts.load_controller(path, which, cfg.vae.z_size, cfg.rnn.hidden_units)
    vae, rnn = rollout.load_world_models(data_dir, cfg, vision_dir=vision_dir, models_dir=models_dir)
    generation = artifacts.selected_generation(info, which) if "generation" in info else None
    where = "" if vision_dir == models_dir == Path(data_dir).absolute() else f", V of {vision_dir}, M of {models_dir}"
    return Agent(cfg, vae, rnn, params, f"{path} ({which}{where})", path.parent, generation)
