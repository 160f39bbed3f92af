"""A trained agent shipped in the repository: ``pretrained/<name>/``, checked on load.

    python -m worldmodels.pretrained export --data-dir /mnt/cpu_run --name carracing-cpu
    python -m worldmodels.pretrained export --data-dir /mnt/cpu_run --name carracing-cpu --float16
    python evaluate_controller.py --pretrained carracing-cpu      # on a fresh clone, no training

A folder holds everything the agent needs and nothing else (no discriminator, no optimiser
state, no data):

* ``config.json``: the controller's resolved config (``vae.model`` says which V it was trained
  with; ``controller.z_input`` what it sees of V's posterior);
* ``vision.npz``: V's encoder and decoder weights, keyed ``encoder/<path>`` and ``decoder/<path>``;
  the encoder and decoder are the same networks for the VAE and the VAE-GAN, so V is rebuilt as
  a :class:`~models.vae.ConvVAE` either way;
* ``rnn.npz``: M's weights keyed by variable path; M is rebuilt from the config;
* ``controller.npz``: ``params`` (N,) float64, the selected controller, and its ``generation``;
* ``MANIFEST.sha256``: the SHA-256 of every other file, in ``sha256sum`` format (so
  ``sha256sum -c MANIFEST.sha256`` checks it too).

Weights are float32, or float16 with ``--float16`` (half the size; ship them only if the
100-track score is unchanged within its noise, measured). :func:`load` checks every file
against the manifest before reading any of it: a file whose digest differs, a missing file or
an unlisted one is a :class:`~worldmodels.storage.CorruptFileError` with a one-line message.
The paper's network sizes make about 19 MB in float32 (V 4.35 M, M 0.42 M parameters).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

import config
from worldmodels import artifacts, storage

ROOT = Path(__file__).resolve().parent.parent / "pretrained"
MANIFEST = storage.MANIFEST_NAME
CONFIG = artifacts.CONFIG_FILE
VISION = "vision.npz"
RNN = "rnn.npz"
CONTROLLER = artifacts.CONTROLLER_FILE
FILES = (CONFIG, VISION, RNN, CONTROLLER)
DTYPES = {"float32": np.float32, "float16": np.float16}


def folder(name_or_path) -> Path:
    """``pretrained/<name>`` of this repository, or the folder itself if a path to one is given."""
    return storage.named_folder(ROOT, name_or_path)


def _weights(model, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + w.path: np.asarray(w.numpy()) for w in model.weights}


def _set_weights(model, arrays: dict, prefix: str, where: Path) -> None:
    """Assign ``arrays[prefix + path]`` to each of ``model``'s variables (cast to the variable's dtype)."""
    expected = {prefix + w.path for w in model.weights}
    given = {key for key in arrays if key.startswith(prefix)}
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise storage.CorruptFileError(f"{where} does not fit the network of its config.json (missing {missing[:3]}, "
                                       f"unexpected {extra[:3]})")
    for w in model.weights:
        value = arrays[prefix + w.path]
        if tuple(value.shape) != tuple(w.shape):
            raise storage.CorruptFileError(f"{where}: {prefix + w.path} has shape {value.shape}, the network "
                                           f"needs {tuple(w.shape)}")
        w.assign(value.astype(w.dtype))


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def export(vision, rnn, params: np.ndarray, cfg: config.Config, out, *, generation: int = -1,
           dtype: str = "float32") -> Path:
    """Write the agent (V ``vision`` with ``encoder``/``decoder``, M ``rnn``, C ``params`` (N,)) to ``out``.

    Every file is written atomically, the manifest last, so a folder with a manifest is complete.
    Returns ``out``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    cast = DTYPES[dtype]
    vision_weights = {**_weights(vision.encoder, "encoder/"), **_weights(vision.decoder, "decoder/")}
    files = {
        CONFIG: None,
        VISION: _npz_bytes({k: v.astype(cast) for k, v in vision_weights.items()}),
        RNN: _npz_bytes({k: v.astype(cast) for k, v in _weights(rnn).items()}),
        CONTROLLER: _npz_bytes({"params": np.asarray(params, np.float64), "generation": np.int64(generation)}),
    }
    out.mkdir(parents=True, exist_ok=True)
    config.save_config(cfg, out, CONFIG)
    for name, data in files.items():
        if data is not None:
            storage.atomic_write_bytes(out / name, data)
    storage.write_manifest(out, FILES)
    return out


def verify(path) -> None:
    """Check every file of the folder against ``MANIFEST.sha256``; CorruptFileError (one line) on any mismatch."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise storage.MissingDataError(f"no pretrained agent at {path} (no {MANIFEST}); available: "
                                       f"{', '.join(available()) or 'none'}")
    storage.verify_manifest(path, "pretrained agent", FILES)


def available() -> list[str]:
    return storage.manifest_folders(ROOT)


def load(name_or_path):
    """``(cfg, vision (ConvVAE), rnn (MDNRNN), params (N,), info)`` of a verified pretrained agent."""
    path = folder(name_or_path)
    verify(path)  # before TensorFlow is imported: a damaged file is reported at once
    from models.controller import num_parameters
    from models.mdn_rnn import MDNRNN
    from models.vae import ConvVAE
    from worldmodels.rnn_training import model_arguments

    cfg = config.load_config(path / CONFIG)
    vision = ConvVAE(z_size=cfg.vae.z_size, kl_tolerance=cfg.vae.kl_tolerance)
    rnn = MDNRNN(**model_arguments(cfg))
    with np.load(path / VISION) as data:
        arrays = {key: data[key] for key in data.files}
    _set_weights(vision.encoder, arrays, "encoder/", path / VISION)
    _set_weights(vision.decoder, arrays, "decoder/", path / VISION)
    with np.load(path / RNN) as data:
        _set_weights(rnn, {key: data[key] for key in data.files}, "", path / RNN)
    with np.load(path / CONTROLLER) as data:
        params = np.array(data["params"], np.float64)
        info = {"generation": int(data["generation"]), "path": str(path),
                "dtype": str(arrays[next(iter(arrays))].dtype)}
    n = num_parameters(cfg.vae.z_size, cfg.rnn.hidden_units)
    if params.shape != (n,):
        raise storage.CorruptFileError(f"{path / CONTROLLER} holds {params.shape} parameters, its config needs ({n},)")
    return cfg, vision, rnn, params, info


def export_from_data(data_dir, name_or_path, *, controller=None, which: str = "params", dtype: str = "float32"):
    """Export the controller in ``<data_dir>/controller`` (or the folder ``controller``) with the V and M it
    drives with (:func:`artifacts.controller_models`: an iteration's controller with its iteration's M)."""
    from worldmodels import rollout

    source = Path(controller) if controller else Path(data_dir) / artifacts.CONTROLLER
    cfg = config.load_config(source / artifacts.CONFIG_FILE)
    params, scalars = artifacts.load_controller(source / artifacts.CONTROLLER_FILE, which, cfg.vae.z_size,
                                                cfg.rnn.hidden_units)
    vision_dir, models_dir = artifacts.controller_models(source, cfg, data_dir)
    vision, rnn = rollout.load_world_models(data_dir, cfg, vision_dir=vision_dir, models_dir=models_dir)
    generation = artifacts.selected_generation(scalars, which)
    return export(vision, rnn, params, cfg, folder(name_or_path), generation=generation, dtype=dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("export", help="copy a trained agent into pretrained/<name>/")
    make.add_argument("--data-dir", type=Path, required=True, help="the run's data folder (V, M and controller/)")
    make.add_argument("--controller", type=Path, help="controller folder (default: <data-dir>/controller)")
    make.add_argument("--name", required=True, help="name under pretrained/ (or a folder path)")
    make.add_argument("--which", choices=("params", "mean", "best_member"), default="params")
    make.add_argument("--float16", action="store_true", help="store the weights in float16 (half the size)")
    check = commands.add_parser("verify", help="check a pretrained agent against its manifest")
    check.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "verify":
        verify(folder(args.name))
        print(f"{folder(args.name)}: every file matches {MANIFEST}")
        return 0
    out = export_from_data(args.data_dir, args.name, controller=args.controller, which=args.which,
                           dtype="float16" if args.float16 else "float32")
    size = sum((out / name).stat().st_size for name in FILES + (MANIFEST,))
    print(f"{out}: {size / 1e6:.1f} MB; score it with: python evaluate_controller.py --pretrained {args.name}")
    return 0


if __name__ == "__main__":
    from worldmodels import cli

    cli.run(main)
