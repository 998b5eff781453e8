"""``llava-sgg study PLAN``: run a grid of commands, each writing one result JSON; resumable.

A plan is YAML:

    name: lr-sensitivity
    command: [python, -m, llava_sgg.cli, demo, --optimizer, "{optimizer}", --lr-scale, "{lr_scale}",
              --seed, "{seed}", --result, "{result}"]
    grid:                      # every combination is one run
      optimizer: [adamw, adamw_sgg]
      lr_scale: [1, 3, 10]
      seed: [0, 1, 2]
      # names joined by "+" vary together: [[adamw, mda], [adamw_sgg, mean_ratio]] gives 2 values, not 4
    # grid may also be a list of such mappings, all naming the same keys: the runs are their union
    # (a run two of them name runs once), and `--part N` runs the N-th alone (a study split over machines).
    fixed: {steps: 2500}       # optional: values every run gets (placeholders too)
    compare:                   # optional, for `llava-sgg report`
      baseline: {optimizer: adamw}
      metrics: {eval_loss: lower, mmbench: higher}
      contrasts:               # optional, more comparisons: each variant with `variant`'s values against
                               # the variant with `against`'s values and its own other values
        - {name: "x3 against x1", variant: {optimizer: adamw, lr_scale: 3}, against: {lr_scale: 1}}

Each run gets a folder ``<study>/runs/<key>/``, ``key`` naming its grid values in the plan's order
(``optimizer=adamw,lr_scale=1,seed=0``). Its command's ``{name}`` placeholders are filled from the
grid, ``fixed``, ``{result}`` (the JSON file the command must write: ``{"metrics": {name: number},
"curves": {name: [[step, value], ...]}, ...}``), ``{run_dir}`` and ``{study_dir}``. The runner writes ``record.json``
beside it: the values, the command, the exit status, the wall time and the result. A run whose
record says it finished with the same command is skipped, so a killed study resumes where it
stopped; a run that failed (a diverging run stops with an error) keeps its record, is reported as
failed, and runs again only with ``retry_failed``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["Plan", "PlanError", "Run", "load_plan", "run_study"]

PLAN_KEYS = {"name", "command", "grid", "fixed", "compare"}
RESERVED = {"result", "run_dir", "study_dir"}
STDERR_KEPT = 4000  # characters of a failed run's log kept in its record


class PlanError(ValueError):
    """A plan that cannot run; the message names the file and key."""


@dataclass(frozen=True)
class Run:
    key: str
    values: dict  # grid values, in the plan's order
    command: tuple[str, ...]


@dataclass
class Plan:
    name: str
    command: list[str]
    grid: dict[str, list] | list[dict[str, list]]  # as the plan gives it
    fixed: dict = field(default_factory=dict)
    compare: dict = field(default_factory=dict)

    @property
    def grids(self) -> list[dict[str, list]]:
        return self.grid if isinstance(self.grid, list) else [self.grid]

    def runs(self, study_dir: Path, part: int | None = None) -> list[Run]:
        """Every run of the plan (of its ``part``-th grid alone, counted from 1), in the plan's order."""
        runs, seen = [], set()
        for index, grid in enumerate(self.grids, start=1):
            if part is not None and index != part:
                continue
            for combo in itertools.product(*grid.values()):
                values = {name: _joined(value) for name, value in zip(grid, combo)}
                key = ",".join(f"{name}={_slug(value)}" for name, value in values.items())
                if key in seen:
                    continue
                seen.add(key)
                folder = study_dir / "runs" / key
                fill = {**self.fixed, "result": str(folder / "result.json"), "run_dir": str(folder),
                        "study_dir": str(study_dir)}
                for name, value in zip(grid, combo):
                    fill.update(zip(name.split("+"), value) if "+" in name else {name: value})
                runs.append(Run(key, values, tuple(part.format(**fill) for part in self.command)))
        return runs


def _joined(value) -> str | int | float:
    """A grid value as runs and reports name it: a list (of names joined by "+") as "a+b"."""
    return "+".join(map(str, value)) if isinstance(value, list) else value


def _slug(value) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan; every problem is a :class:`PlanError` naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise PlanError(f"{path}: cannot read the plan ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise PlanError(f"{path}: a plan is a mapping with keys {', '.join(sorted(PLAN_KEYS))}")
    unknown = set(raw) - PLAN_KEYS
    if unknown:
        raise PlanError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(PLAN_KEYS))}")
    for key in ("name", "command", "grid"):
        if key not in raw:
            raise PlanError(f"{path}: missing {key!r}")
    name, command, grid = raw["name"], raw["command"], raw["grid"]
    fixed, compare = raw.get("fixed") or {}, raw.get("compare") or {}
    if not isinstance(name, str) or not name:
        raise PlanError(f"{path}: name must be a non-empty string")
    if not isinstance(command, list) or not command or not all(isinstance(c, (str, int, float)) for c in command):
        raise PlanError(f"{path}: command must be a list of strings (the program and its arguments)")
    command = [str(c) for c in command]
    grids = grid if isinstance(grid, list) and grid else [grid]
    for index, one in enumerate(grids):
        where = f"grid[{index}]" if isinstance(grid, list) else "grid"
        if not isinstance(one, dict) or not one:
            raise PlanError(f"{path}: {where} must map each varied name to a list of values"
                            + (" (or grid be a list of such mappings)" if not isinstance(grid, list) else ""))
        if list(one) != list(grids[0]):
            raise PlanError(f"{path}: {where} names {', '.join(one)}; every grid of the list must name "
                            f"{', '.join(grids[0])}, in that order")
        for key, values in one.items():
            if not isinstance(values, list) or not values:
                raise PlanError(f"{path}: {where}.{key} must be a non-empty list of values")
            if "+" in key and not all(isinstance(v, list) and len(v) == len(key.split("+")) for v in values):
                raise PlanError(f"{path}: {where}.{key} varies {len(key.split('+'))} names together: each value "
                                f"must be a list of {len(key.split('+'))}")
            if len({_slug(_joined(v)) for v in values}) != len(values):
                raise PlanError(f"{path}: {where}.{key} has values that name the same run: {values}")
    if not isinstance(fixed, dict):
        raise PlanError(f"{path}: fixed must map names to values")
    names = {name for key in grids[0] for name in key.split("+")}
    clash = (names & set(fixed)) | ((names | set(fixed)) & RESERVED)
    if clash:
        raise PlanError(f"{path}: {', '.join(sorted(clash))} is given twice (grid, fixed, or the runner's "
                        f"{', '.join(sorted(RESERVED))})")
    known = names | set(fixed) | RESERVED
    for part in command:
        for placeholder in re.findall(r"{([^{}]*)}", part):
            if placeholder not in known:
                raise PlanError(f"{path}: command placeholder {{{placeholder}}} is not in grid or fixed "
                                f"(known: {', '.join(sorted(known))})")
    _check_compare(path, compare, grids)
    return Plan(name, command, grid, fixed, compare)


def _check_compare(path: Path, compare: dict, grids: list[dict]) -> None:
    if not isinstance(compare, dict) or set(compare) - {"baseline", "metrics", "contrasts"}:
        raise PlanError(f"{path}: compare takes baseline (grid values), metrics (name: lower|higher) and "
                        "contrasts (a list of {name, variant, against})")

    def check_values(where: str, values) -> None:
        if not isinstance(values, dict) or not values:
            raise PlanError(f"{path}: {where} must map grid keys to grid values")
        for key, value in values.items():
            if key not in grids[0] or value not in [_joined(v) for grid in grids for v in grid[key]]:
                raise PlanError(f"{path}: {where}.{key}={value!r} is not a grid value")

    if compare.get("baseline"):
        check_values("compare.baseline", compare["baseline"])
    contrasts = compare.get("contrasts") or []
    if not isinstance(contrasts, list):
        raise PlanError(f"{path}: compare.contrasts must be a list of {{name, variant, against}}")
    for i, contrast in enumerate(contrasts):
        if not isinstance(contrast, dict) or set(contrast) != {"name", "variant", "against"}:
            raise PlanError(f"{path}: compare.contrasts[{i}] takes exactly name, variant and against")
        check_values(f"compare.contrasts[{i}].variant", contrast["variant"])
        check_values(f"compare.contrasts[{i}].against", contrast["against"])
    for metric, better in (compare.get("metrics") or {}).items():
        if better not in ("lower", "higher"):
            raise PlanError(f"{path}: compare.metrics.{metric} must be lower or higher (which is better)")


def _record_path(study_dir: Path, run: Run) -> Path:
    return study_dir / "runs" / run.key / "record.json"


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # absent, or cut short by a kill: the run has not finished


def _execute(study_dir: Path, run: Run) -> dict:
    folder = study_dir / "runs" / run.key
    folder.mkdir(parents=True, exist_ok=True)
    result_path = folder / "result.json"
    result_path.unlink(missing_ok=True)  # a result left by a killed attempt is not this attempt's
    started = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        process = subprocess.run(list(run.command), stdout=log, stderr=subprocess.STDOUT)
    record = {"key": run.key, "values": run.values, "command": list(run.command),
              "returncode": process.returncode, "wall_s": round(time.perf_counter() - started, 3),
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if process.returncode == 0:
        try:
            record["result"] = json.loads(result_path.read_text())
            record["status"] = "finished"
        except (OSError, json.JSONDecodeError) as e:
            record["status"] = "failed"
            record["error"] = f"the command exited 0 but its result {result_path} is missing or invalid ({e})"
    else:
        record["status"] = "failed"
        record["error"] = (folder / "log.txt").read_text(errors="replace")[-STDERR_KEPT:]
    # Written last and atomically: a record present means the run ended (a kill leaves none).
    tmp = folder / "record.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, folder / "record.json")
    return record


def run_study(plan: Plan, study_dir: str | os.PathLike, *, jobs: int = 1, retry_failed: bool = False,
              part: int | None = None, echo: Callable[[str], object] = print) -> list[dict]:
    """Run every run of ``plan`` (of its ``part``-th grid) not yet finished, ``jobs`` at a time; returns their records.

    The plan is copied into the study folder (``plan.yaml``), which ``llava-sgg report`` reads.
    """
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "plan.yaml").write_text(yaml.safe_dump(
        {"name": plan.name, "command": plan.command, "grid": plan.grid, "fixed": plan.fixed,
         "compare": plan.compare}, sort_keys=False))
    if part is not None and not 1 <= part <= len(plan.grids):
        raise PlanError(f"plan {plan.name!r} has {len(plan.grids)} grid(s); part must be 1..{len(plan.grids)}, "
                        f"got {part}")
    runs = plan.runs(study_dir, part)
    records, todo = {}, []
    for run in runs:
        record = read_record(_record_path(study_dir, run))
        same = record is not None and record.get("command") == list(run.command)
        if same and (record["status"] == "finished" or (record["status"] == "failed" and not retry_failed)):
            records[run.key] = record
        else:
            todo.append(run)
    echo(f"study {plan.name}: {len(runs)} runs, {len(runs) - len(todo)} done before, {len(todo)} to run "
         f"({jobs} at a time) in {study_dir}")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_execute, study_dir, run): run for run in todo}
        for done, future in enumerate(as_completed(futures), start=1):
            run, record = futures[future], future.result()
            records[run.key] = record
            echo(f"[{done}/{len(todo)}] {run.key}: {record['status']} in {record['wall_s']:.1f} s"
                 + (f" (exit {record['returncode']}; see {study_dir / 'runs' / run.key / 'log.txt'})"
                    if record["status"] == "failed" else ""))
    failed = [key for key, r in records.items() if r["status"] == "failed"]
    if failed:
        echo(f"{len(failed)} run(s) failed: {', '.join(failed)}; `llava-sgg report` marks them "
             "(rerun them with --retry-failed)")
    return [records[run.key] for run in runs]

