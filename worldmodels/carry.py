"""A long stage-5 search carried between machines that keep nothing: ``checkpoints/<name>/``.

    python -m worldmodels.carry save --data-dir /mnt/run --name cpu-gan-s0 \\
        --command "python 05_train_controller.py --preset cpu --data-dir /mnt/run --set vae.model=vae_gan"
    python -m worldmodels.carry restore cpu-gan-s0 --data-dir /mnt/run      # on the next machine
    python 05_train_controller.py --preset cpu --data-dir /mnt/run --set vae.model=vae_gan   # goes on

Stage 5 resumes bit for bit from its own folder (``worldmodels.evolution``), but only on a
machine that still has that folder. A spot instance, a laptop that is wiped, or a workplace
that hands out a fresh machine per working session keeps nothing, and a search of many hours
would start again from generation 0 each time. A carry is the smallest set of files from which
the search continues exactly where it stopped, copied byte for byte (so the resumed search is the
uninterrupted one):

* V: ``<vae or vae_gan>/<model>.keras`` with its ``config.json`` (and ``metrics.json``, ``split.json``);
* M: ``rnn/rnn.keras`` with its ``config.json`` (and ``metrics.json``, ``split.json``);
* the search folder (``controller/`` or a dream folder): its checkpoint ``evolution.pkl``,
  ``history.csv``, ``eval.csv``, ``controller.npz``, ``config.json`` and ``metrics.json``
  (the figures are redrawn from the tables), and its scores ``evaluation_s<base>_n<count>.json``/``.csv``
  (a seed study's, or ``evaluate_controller.py``'s default), so a finished search is not scored again;
* ``carry.json`` (the generation, the command that continues it) and ``MANIFEST.sha256``.

The iterative procedure (``06_iterate.py``) travels with ``--iterations``: V, stage 4's M, the
controller iteration 1 started from, ``iterations/`` with its table, and per iteration its M, its
search (the checkpoint ``evolution.pkl`` only for a search not yet finished: a finished iteration's is
never read again), its scores, ``curiosity.npz``, ``repair.npz``, ``seconds.json`` and
``diagnostics.png``. Its episodes do not travel (~0.8 MB of frames each): after a restore, stages 1
and 3 make the data dir's series again, and ``06_iterate.py`` records a finished iteration's
episodes again where they are missing (``iterate.refill_data``) before it goes on.

Several searches on the same V and M travel as one carry (``--search`` repeated, or a pattern such as
``'controller_seeds/seed_*'`` for a seed study, whose finished seeds keep their scores): V and M once,
each search folder with its own files, and ``carry.json`` records every search's generation.

No rollouts, latent series or training state of V and M are carried: a real-environment search
needs none of them (a dream search starts from its data's series: after a restore, regenerate them
with stages 1 and 3, from the same episode seeds). Saving over an existing carry replaces only the
files that changed, so a version-controlled carry grows by about the checkpoint (~13 MB for the
paper's 867 parameters, whose CMA covariance is 867 x 867) per save. Restoring checks every file
against the manifest first and refuses to overwrite a different file in the data folder unless
``--force``.
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
from pathlib import Path

import config
from worldmodels import artifacts, iterate, storage

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
INFO = "carry.json"
SEARCH_FILES = ("evolution.pkl", "history.csv", "eval.csv", artifacts.CONTROLLER_FILE, artifacts.CONFIG_FILE,
                artifacts.METRICS_FILE)
MODEL_FILES = (artifacts.CONFIG_FILE, artifacts.METRICS_FILE, artifacts.SPLIT_FILE)
# Carried when present; every other file listed above must exist.
OPTIONAL = (artifacts.METRICS_FILE, artifacts.SPLIT_FILE, "eval.csv", artifacts.CONTROLLER_FILE)
# An iteration's own files besides its M and its search, carried when present.
ITERATION_FILES = (iterate.CURIOSITY_FILE, iterate.REPAIR_FILE, iterate.CLOCK_FILE, iterate.DIAGNOSTICS_FIGURE)


def folder(name_or_path) -> Path:
    """``checkpoints/<name>`` of this repository, or the folder itself if a path is given."""
    return storage.named_folder(ROOT, name_or_path)


def searches(data_dir, patterns) -> list[str]:
    """The search folders (relative to ``data_dir``, sorted, each once) that ``patterns`` name: plain
    folder names, or glob patterns such as ``controller_seeds/seed_*``. A pattern that matches no
    folder with a search checkpoint is a MissingDataError naming it."""
    data_dir, found = Path(data_dir), []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matches = sorted(path.parent.relative_to(data_dir).as_posix()
                         for path in data_dir.glob(f"{pattern}/evolution.pkl"))
        if not matches:
            raise storage.MissingDataError(f"{data_dir / pattern} holds no search checkpoint (evolution.pkl and "
                                           f"config.json); run stage 5 for at least one generation first")
        found += [match for match in matches if match not in found]
    return found


def carried_files(data_dir, search=artifacts.CONTROLLER) -> list[str]:
    """Paths (relative to ``data_dir``) of the files a carry of the search folder(s) ``search`` holds.

    ``search`` is a folder name or pattern, or a list of them (:func:`searches`); all must be searches
    on the same V kind, read from each search's own ``config.json``. Raises MissingDataError, naming
    what is missing, if a search has no checkpoint yet or V or M is absent, and ValueError if the
    searches were made on different V kinds (a carry holds one V and one M).
    """
    data_dir = Path(data_dir)
    folders = searches(data_dir, search)
    kinds = {}
    for name in folders:
        saved = data_dir / name / artifacts.CONFIG_FILE
        if not saved.exists():
            raise storage.MissingDataError(f"{saved} is missing; a carry needs it to resume")
        kinds[name] = config.load_config(saved).vae.model
    if len(set(kinds.values())) > 1:
        raise ValueError(f"the searches were made on different V kinds ({kinds}); carry each kind apart")
    vision_folder, vision_name = artifacts.VISION[kinds[folders[0]]]
    groups = [(vision_folder, (vision_name,) + MODEL_FILES), (artifacts.RNN[0], (artifacts.RNN[1],) + MODEL_FILES)]
    groups += [(name, SEARCH_FILES) for name in folders]
    names = []
    for sub, files in groups:
        names += _present(data_dir, sub, files)
        # Scores on held-out tracks (evaluate_controller.py's default files, a seed study's score) are small
        # and cost minutes of simulation each: carried too, so a finished search needs no re-scoring.
        if sub in folders:
            names += _scores(data_dir, sub)
    return names


def _present(data_dir: Path, sub: str, files, optional=OPTIONAL) -> list[str]:
    """``sub/<name>`` for every name in ``files`` found in ``data_dir/sub``; a missing one not in ``optional`` is a
    MissingDataError."""
    names = []
    for name in files:
        if (data_dir / sub / name).exists():
            names.append(f"{sub}/{name}")
        elif name not in optional:
            raise storage.MissingDataError(f"{data_dir / sub / name} is missing; a carry needs it to resume")
    return names


def _scores(data_dir: Path, sub: str) -> list[str]:
    return sorted(f"{sub}/{path.name}" for path in (data_dir / sub).glob(artifacts.EVALUATIONS))


def iteration_files(data_dir) -> list[str]:
    """Paths (relative to ``data_dir``) of the files a carry of the iterative procedure holds (module docstring).

    Raises MissingDataError if ``<data>/iterations`` has no ``config.json`` (06_iterate.py never ran) or V or
    stage 4's M is missing. An iteration's M travels once complete (``metrics.json`` written); one still
    training is trained again from the previous M on the next machine (the same steps, the same batches).
    """
    data_dir = Path(data_dir)
    root = data_dir / artifacts.ITERATIONS
    if not (root / artifacts.CONFIG_FILE).exists():
        raise storage.MissingDataError(f"{root} holds no iterative procedure (no {artifacts.CONFIG_FILE}); run "
                                       f"06_iterate.py first")
    cfg = config.load_config(root / artifacts.CONFIG_FILE)
    finished = len(iterate.read_rows(root / artifacts.ITERATIONS_TABLE))
    vision_folder, vision_name = artifacts.VISION[cfg.vae.model]
    names = _present(data_dir, vision_folder, (vision_name,) + MODEL_FILES)
    names += _present(data_dir, artifacts.RNN[0], (artifacts.RNN[1],) + MODEL_FILES)
    names += _present(data_dir, artifacts.ITERATIONS, (artifacts.CONFIG_FILE, artifacts.ITERATIONS_TABLE,
                                                       artifacts.ITERATIONS_START),
                      optional=(artifacts.ITERATIONS_TABLE, artifacts.ITERATIONS_START))
    start = artifacts.iterations_start_dir(data_dir, cfg.dream.temperature)
    if start is not None:  # the controller iteration 1 collected with and started from
        sub = start.relative_to(data_dir).as_posix()
        names += _present(data_dir, sub, SEARCH_FILES[1:]) + _scores(data_dir, sub)
    for folder in sorted(root.glob("iter_[0-9][0-9][0-9]")):
        sub = folder.relative_to(data_dir).as_posix()
        names += _present(data_dir, sub, ITERATION_FILES, optional=ITERATION_FILES)
        if (folder / artifacts.RNN[0] / artifacts.METRICS_FILE).exists():
            names += _present(data_dir, f"{sub}/{artifacts.RNN[0]}", (artifacts.RNN[1],) + MODEL_FILES)
        search = f"{sub}/{artifacts.CONTROLLER}"
        if (data_dir / search / "history.csv").exists():
            unfinished = int(folder.name[len("iter_"):]) > finished
            names += _present(data_dir, search, SEARCH_FILES if unfinished else SEARCH_FILES[1:])
            names += _scores(data_dir, search)
    return names


def _progress(data_dir: Path, search: str) -> dict:
    """Generation, wall time and real environment steps of one search, read from its ``history.csv``."""
    with open(data_dir / search / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    return {"generation": len(history),
            "elapsed_seconds": float(history[-1]["elapsed"]) if history else 0.0,
            "env_steps": int(sum(steps for steps in (float(row.get("env_steps") or "nan") for row in history)
                                 if math.isfinite(steps)))}


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as f:
        storage.atomic_write(target, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def save(data_dir, name_or_path, *, search=artifacts.CONTROLLER, command: str = "", iterations: bool = False) -> dict:
    """Copy the files of :func:`carried_files` (or with ``iterations`` :func:`iteration_files`) into the carry
    folder; returns its ``carry.json``.

    ``carry.json`` gives the first search's ``search``, ``generation``, ``elapsed_seconds`` and
    ``env_steps`` (the fields of a one-search carry) and, under ``searches``, those of every search; a carry
    of the iterative procedure gives ``search`` "iterations" and the number of finished ``iterations``.
    Stop the run first: a copy taken while a generation is being written may pair a history
    with the checkpoint before it (each file is complete, but not the set).
    """
    data_dir, out = Path(data_dir), folder(name_or_path)
    names = iteration_files(data_dir) if iterations else carried_files(data_dir, search)
    folders = [] if iterations else searches(data_dir, search)
    out.mkdir(parents=True, exist_ok=True)
    for stale in set(storage.read_manifest(out, "carry")) - set(names) if (out / storage.MANIFEST_NAME).exists() else ():
        (out / stale).unlink(missing_ok=True)
    for name in names:
        if not (out / name).exists() or storage.sha256(out / name) != storage.sha256(data_dir / name):
            _copy(data_dir / name, out / name)
    if iterations:
        rows = iterate.read_rows(data_dir / artifacts.ITERATIONS / artifacts.ITERATIONS_TABLE)
        info = {"search": artifacts.ITERATIONS, "iterations": len(rows), "command": command}
    else:
        progress = {name: _progress(data_dir, name) for name in folders}
        info = {"search": folders[0], **progress[folders[0]], "command": command}
        if len(folders) > 1:
            info["searches"] = progress
    storage.atomic_write_json(out / INFO, info)
    storage.write_manifest(out, names + [INFO])
    return info


def restore(name_or_path, data_dir, *, force: bool = False) -> dict:
    """Check the carry against its manifest, then copy its files into ``data_dir``; returns ``carry.json``.

    A file already in ``data_dir`` with the same content is left alone; one with other content is
    an error naming it (the data folder holds another run, or a search that went further) unless
    ``force``.
    """
    source, data_dir = folder(name_or_path), Path(data_dir)
    if not (source / storage.MANIFEST_NAME).exists():
        raise storage.MissingDataError(f"no carry at {source} (no {storage.MANIFEST_NAME}); available: "
                                       f"{', '.join(available()) or 'none'}")
    listed = storage.verify_manifest(source, "carry")
    names = [name for name in listed if name != INFO]
    differ = [name for name in names if (data_dir / name).exists() and storage.sha256(data_dir / name) != listed[name]]
    if differ and not force:
        raise storage.CorruptFileError(
            f"{data_dir} already holds other versions of {', '.join(differ)} (another run, or a search that went "
            f"further); restore into an empty folder, or pass --force to replace them")
    for name in names:
        if not (data_dir / name).exists() or storage.sha256(data_dir / name) != listed[name]:
            _copy(source / name, data_dir / name)
    return storage.read_json(source / INFO)


def _generations(info: dict) -> str:
    """'generation 186 of controller/', one such part per search of a carry of several, or '2 finished
    iteration(s) of iterations/'."""
    if info["search"] == artifacts.ITERATIONS and "iterations" in info:
        return f"{info['iterations']} finished iteration(s) of {artifacts.ITERATIONS}/"
    progress = info.get("searches") or {info["search"]: info}
    return ", ".join(f"generation {p['generation']} of {name}/" for name, p in progress.items())


def available() -> list[str]:
    return storage.manifest_folders(ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    put = commands.add_parser("save", help="copy a stopped search (with its V and M) into checkpoints/<name>/")
    put.add_argument("--data-dir", type=Path, required=True, help="the run's data folder")
    put.add_argument("--name", required=True, help="name under checkpoints/ (or a folder path)")
    put.add_argument("--search", action="append",
                     help="a search folder inside the data folder, or a pattern such as 'controller_seeds/seed_*'; "
                          "repeat it to carry several searches on the same V and M (default: controller)")
    put.add_argument("--iterations", action="store_true",
                     help="carry the iterative procedure (06_iterate.py's iterations/) instead of searches")
    put.add_argument("--command", dest="resume", default="", help="the command that continues the search")
    get = commands.add_parser("restore", help="copy a carry into a data folder, to continue its search")
    get.add_argument("name", help="name under checkpoints/ (or a folder path)")
    get.add_argument("--data-dir", type=Path, required=True, help="the data folder to continue in")
    get.add_argument("--force", action="store_true", help="replace files of the data folder that differ")
    args = parser.parse_args(argv)
    if args.command == "save":
        if args.iterations and args.search:
            parser.error("--iterations carries the iterative procedure; give it without --search")
        info = save(args.data_dir, args.name, search=args.search or [artifacts.CONTROLLER], command=args.resume,
                    iterations=args.iterations)
        out = folder(args.name)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"{out}: {_generations(info)}, {size / 1e6:.1f} MB; restore it with: "
              f"python -m worldmodels.carry restore {args.name} --data-dir DIR")
        return 0
    info = restore(args.name, args.data_dir, force=args.force)
    print(f"{args.data_dir}: restored {_generations(info)}"
          + (f"; continue with: {info['command']}" if info.get("command") else ""))
    return 0


if __name__ == "__main__":
    from worldmodels import cli

    cli.run(main)
