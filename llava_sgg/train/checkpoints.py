"""Checkpoints that are complete or ignored, and outputs that say whether the run finished.

Trainer writes ``checkpoint-N/`` file by file: the model, the optimizer (SGG's cluster ids and scales
inside it; under FSDP2 every rank its shards, and ``sgg_state/``), the scheduler, the RNG states, then
``trainer_state.json``. A kill in between leaves a folder that looks like a checkpoint and is not, and
Trainer's resume skips an absent optimizer or scheduler file, so it silently restarts both.

Here Trainer writes into ``saving-checkpoint/checkpoint-N/`` (:data:`STAGING`); once every rank has
written, the main process seals the folder (every file fsync'd, then :data:`MANIFEST`, naming each file
with its size, written last and fsync'd) and renames it to ``checkpoint-N/``. A ``checkpoint-N/`` folder
therefore exists only complete, and its manifest tells a file removed or truncated since.
:func:`newest_complete` is what ``resume_from_checkpoint=last`` takes; :func:`check_resumable` refuses,
naming the file, a checkpoint that lacks anything the run reads back.

The final outputs (model, processor, config, loss history) share ``output_dir`` with the checkpoints, so
they are sealed in place instead: :data:`RUN_COMPLETE` is removed before they are written and written
after them, with the step and the run config (:func:`seal_outputs`, :func:`finished_run`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint_complete.json"
STAGING = "saving-checkpoint"  # not "checkpoint-*": Trainer's own globs never see it
RUN_COMPLETE = "run_complete.json"
# Listed in the manifest but not needed to resume: Trainer resumes without RNG states (the data order is
# seeded; dropout would differ) and never reads its pickled TrainingArguments back.
OPTIONAL = ("rng_state*.pth", "training_args.bin")
_STEP = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and the file."""


def step_of(folder: str | Path) -> int | None:
    match = _STEP.match(Path(folder).name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------ writing

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(folder: Path, files: list[str], name: str = MANIFEST, **record) -> Path:
    """Write ``name`` in ``folder``, listing ``files`` (paths relative to it) with their sizes, after fsyncing them.

    Written last and fsync'd itself, the manifest marks the folder complete: a kill before it leaves
    no manifest, and any file removed or truncated later no longer matches it.
    """
    sizes = {}
    for relative in sorted(files):
        path = folder / relative
        _fsync(path)
        sizes[relative] = path.stat().st_size
    for sub in {(folder / relative).parent for relative in files} | {folder}:
        _fsync(sub)
    manifest = folder / name
    with open(manifest, "w") as f:
        json.dump({**record, "files": sizes}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)
    return manifest


def seal_checkpoint(folder: Path, global_step: int) -> None:
    files = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    seal(folder, files, MANIFEST, global_step=global_step)


def publish(staged: Path, final: Path) -> None:
    """Rename the sealed ``staged`` folder to ``final``, replacing a folder of that name (an older save of the step)."""
    replaced = None
    if final.exists():
        replaced = staged.parent / f"replaced-{final.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staged, final)
    _fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    try:
        staged.parent.rmdir()
    except OSError:
        pass  # not empty: left by someone else


def rotate(output_dir: Path, limit: int | None, keep: Path) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``limit`` (save_total_limit), never ``keep`` (the one just
    written). An incomplete folder is no checkpoint: it neither counts nor is deleted in favour of one."""
    if not limit or limit <= 0:
        return []
    complete = [p for p in checkpoint_folders(output_dir) if not manifest_problems(p)]
    deleted = []
    for folder in sorted(complete, key=step_of):
        if len(complete) - len(deleted) <= limit:
            break
        if folder != keep:
            (folder / MANIFEST).unlink()  # first: a deletion cut short leaves an incomplete folder, never a wrong one
            shutil.rmtree(folder, ignore_errors=True)
            deleted.append(folder)
    return deleted


# ------------------------------------------------------------------ reading

def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [p for p in output_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=step_of, reverse=True)


def manifest_problems(folder: Path, name: str = MANIFEST) -> list[str]:
    """Why ``folder`` is not as its manifest says: no manifest, files missing or of another size. Empty: complete."""
    manifest = folder / name
    if not manifest.is_file():
        return [f"no {name} (its save did not finish, or it was not written by llava-sgg)"]
    try:
        sizes = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        return [f"{manifest} is not a valid manifest ({error})"]
    problems = []
    for relative, size in sizes.items():
        path = folder / relative
        if not path.is_file():
            if not any(fnmatch.fnmatch(Path(relative).name, pattern) for pattern in OPTIONAL):
                problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} when it was saved "
                            "(truncated or overwritten)")
    return problems


def checkpoint_problems(folder: Path) -> list[str]:
    """Manifest problems, and a trainer_state.json that does not parse (Trainer's error would not name it)."""
    problems = manifest_problems(folder)
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            json.loads(state.read_text())
        except ValueError as error:
            problems.append(f"{state} is not valid JSON ({error})")
    return problems


def newest_complete(output_dir: str | Path) -> Path | None:
    """The checkpoint ``resume_from_checkpoint=last`` takes: the complete one of the highest step.

    Logs each newer one skipped, and why. None if ``output_dir`` holds no checkpoint and no interrupted
    save (a first start); a CheckpointError if it holds some but none complete.
    """
    skipped = []
    staging = Path(output_dir) / STAGING
    interrupted = [p for p in staging.iterdir() if step_of(p) is not None] if staging.is_dir() else []
    for folder in checkpoint_folders(output_dir):
        problems = checkpoint_problems(folder)
        if not problems:
            for partial in interrupted:
                if step_of(partial) > step_of(folder):
                    skipped.append(f"{partial} (a save interrupted before it was complete)")
            if skipped:
                logger.warning("resume_from_checkpoint=last: resuming from %s, skipping %s", folder,
                               "; ".join(skipped))
            return folder
        skipped.append(f"{folder.name}: {'; '.join(problems)}")
    if skipped:
        raise CheckpointError(f"resume_from_checkpoint=last: no complete checkpoint in {output_dir}: "
                              + " | ".join(skipped))
    if interrupted:
        logger.warning("resume_from_checkpoint=last: no checkpoint in %s yet (%s interrupted before it was "
                       "complete); training from step 0", output_dir, ", ".join(p.name for p in interrupted))
    else:
        logger.warning("resume_from_checkpoint=last: no checkpoint in %s yet; training from step 0", output_dir)
    return None


def check_resumable(folder: str | Path, needs: dict[str, tuple[str, ...]]) -> None:
    """Refuse ``folder`` unless it is complete and holds each file of ``needs`` (a name, and the name patterns
    of its accepted layouts): without one, Trainer would start that state afresh (an optimizer without
    its moments and SGG clusters, a learning-rate schedule back at its start) and say nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {folder} is not a folder")
    problems = checkpoint_problems(folder)
    names = [p.name for p in folder.iterdir()]
    for needed, patterns in needs.items():
        if not any(fnmatch.fnmatch(name, pattern) for name in names for pattern in patterns):
            problems.append(f"{folder / needed} is missing")
    problems = list(dict.fromkeys(problems))  # a file both listed by the manifest and needed: once
    if problems:
        raise CheckpointError(f"cannot resume from {folder}: {'; '.join(problems)}. Resume from another "
                              "checkpoint (train.resume_from_checkpoint=FOLDER, or last for the newest complete one)")
    if not any(fnmatch.fnmatch(name, OPTIONAL[0]) for name in names):
        logger.warning("%s holds no RNG state: the run resumes, but random draws (dropout) differ from an "
                       "uninterrupted run", folder)


# ------------------------------------------------------------------ the final outputs

def begin_outputs(output_dir: Path) -> None:
    """Called before the final outputs are written: until :func:`seal_outputs`, they are incomplete."""
    (output_dir / RUN_COMPLETE).unlink(missing_ok=True)


def seal_outputs(output_dir: Path, global_step: int, config: dict) -> None:
    files = [p.name for p in sorted(output_dir.iterdir()) if p.is_file() and p.name != RUN_COMPLETE]
    seal(output_dir, files, RUN_COMPLETE, global_step=global_step, config=_plain(config))


def outputs_complete(output_dir: Path, global_step: int) -> bool:
    """Are the final outputs in ``output_dir`` complete, and those of step ``global_step``?"""
    if manifest_problems(output_dir, RUN_COMPLETE):
        return False
    return json.loads((output_dir / RUN_COMPLETE).read_text()).get("global_step") == global_step


def finished_run(output_dir: str | Path, config: dict, resume: str) -> int | None:
    """The step at which this very run already finished, or None.

    Finished: its outputs are complete, written at the step of the checkpoint ``resume`` names ("last":
    the newest complete one), by a run of the same config (where it resumed from and where the folder
    is aside).
    Then there is nothing to train or write, and nothing needs loading to say so. A changed config
    (say a longer ``max_steps``) goes through the Trainer, which compares steps with its schedule.
    """
    output_dir = Path(output_dir)
    if manifest_problems(output_dir, RUN_COMPLETE):
        return None
    record = json.loads((output_dir / RUN_COMPLETE).read_text())
    if resume == "last":
        newest = [p for p in checkpoint_folders(output_dir) if not checkpoint_problems(p)]
        step = step_of(newest[0]) if newest else None
    else:
        step = step_of(resume)
    return step if step is not None and record.get("global_step") == step \
        and _what_is_trained(record.get("config")) == _what_is_trained(_plain(config)) else None


def _plain(config: dict) -> dict:
    return json.loads(json.dumps(config, default=str))  # tuples as lists, as the manifest holds them


def _what_is_trained(config) -> dict | None:
    if not isinstance(config, dict):
        return None
    train = {key: value for key, value in config.get("train", {}).items()
             if key not in ("resume_from_checkpoint", "output_dir")}
    return {**config, "train": train}
