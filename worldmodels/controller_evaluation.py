"""Scoring a saved controller on held-out tracks, and recording it: the library of ``evaluate_controller.py``.

:func:`load_controller` reads one parameter vector of a ``controller.npz``;
:func:`evaluate_params` scores it with V and M on any tracks, full episodes on gymnasium's stock
pixels unless ``env.observation`` says otherwise, and :func:`evaluate_saved` on the
final-evaluation tracks (never used for training or for picking the controller);
:func:`write_track_csv` records one row per track; :func:`replay_frames` and :func:`write_video` replay
an evaluated episode at full resolution into a ``.gif`` (or ``.mp4`` with ``imageio[ffmpeg]``).
``worldmodels.figures`` uses the same functions for README's driving animation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

import config
from models.controller import num_parameters
from worldmodels import artifacts, envpool, rollout, storage

# TensorFlow is imported in evaluate_saved(), after the checks: a missing file is reported at once.

WHICH = ("params", "mean", "best_member")
VIDEO_FPS = 50  # CarRacing's simulation rate


def load_controller(path: Path, which: str, z_size: int, hidden: int) -> tuple[np.ndarray, dict]:
    """Parameters ``which`` (N,) from a ``controller.npz`` of stage 5, and its scalars."""
    num_params = num_parameters(z_size, hidden)
    if not path.exists():
        raise storage.MissingDataError(f"no controller at {path}; train one first with: python {artifacts.MAKERS[artifacts.CONTROLLER]}")
    try:
        with np.load(path) as data:
            params = np.array(data[which], dtype=np.float64)
            info = {key: data[key].item() for key in data.files if data[key].ndim == 0}
    except Exception as exc:  # zip, zlib and key errors all mean the file is unusable
        raise storage.CorruptFileError(f"{path} is not a readable controller file ({type(exc).__name__}: {exc})") from exc
    if params.shape != (num_params,):
        raise config.ConfigError(f"{path} holds parameters of shape {params.shape}, but vae.z_size={z_size} and "
                                 f"rnn.hidden_units={hidden} need ({num_params},): use the config it was trained with")
    if not np.all(np.isfinite(params)):
        raise storage.CorruptFileError(f"{path}: parameters {which!r} are not finite")
    return params, info


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
    """One row per track: index, seed, return, steps (atomically)."""
    rows = ["track,seed,return,steps"] + [f"{i},{seed},{score!r},{steps}" for i, (seed, score, steps)
                                          in enumerate(zip(metrics["seeds"], metrics["scores"], metrics["lengths"]))]
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
                    record_actions: bool) -> dict:
    """Run ``params`` (N,) with V and M on tracks ``seeds`` (E,), full episodes; rollout.evaluate's dict."""
    with real_world(cfg, vae, rnn, min(len(seeds), max_concurrent)) as world:
        return rollout.evaluate(world, params, seeds, cfg.controller.max_steps, max_concurrent, record_actions,
                                progress="held-out tracks")


def evaluate_saved(cfg, data_dir: Path, params: np.ndarray, episodes: int, max_concurrent: int,
                   record_actions: bool) -> dict:
    """Load V and M from ``data_dir``, run ``params`` on the first ``episodes`` final-evaluation tracks,
    return rollout.final_evaluation's dict (what the driving animation of worldmodels.figures uses)."""
    vae, rnn = rollout.load_world_models(data_dir, cfg)
    with real_world(cfg, vae, rnn, min(episodes, max_concurrent)) as world:
        return rollout.final_evaluation(world, params, cfg, episodes, max_concurrent, record_actions,
                                        progress="held-out tracks")
