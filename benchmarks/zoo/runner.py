"""Run the check of each model in its own process, with a time limit, and append its row to a CSV at once, so that
a sweep survives crashes and picks up where it stopped."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from benchmarks.zoo.catalog import Model
from benchmarks.zoo.check import STAGES

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("name", "family", "params", "size", "route", *STAGES, "max_error", "layers", "scored", "plain_loop",
          "seconds", "causes")


def read(path: Path) -> list[dict]:
    """The rows of a results CSV (none if it does not exist yet)."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def sweep(models: Iterable[Model], path: Path, limit: float, jobs: int = 1, threads: int = 1,
          log: Callable[[str], None] = print) -> list[dict]:
    """Check every model not yet in ``path``, ``jobs`` at a time, each within ``limit`` seconds; all rows."""
    rows = read(path)
    done = {row["name"] for row in rows}
    todo = [model for model in models if model.name not in done]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows or list(rows[0]) != list(FIELDS):  # new, or written with other columns: (re)write the header
        _write(path, rows)
    with path.open("a", newline="") as file, ThreadPoolExecutor(jobs) as pool:
        writer = csv.DictWriter(file, FIELDS, extrasaction="ignore")
        futures = {pool.submit(check, model, limit, threads): model for model in todo}
        for i, future in enumerate(as_completed(futures), 1):
            row = future.result()
            writer.writerow(row)
            file.flush()
            log(f"[{i}/{len(todo)}] {row['name']}: {verdict(row)} ({row['seconds']} s)")
    return read(path)


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def verdict(row: dict) -> str:
    failed = [stage for stage in STAGES if row[stage] == "fail"]
    return "ok" if not failed else f"{', '.join(failed)} failed: {row['causes']}"


def check(model: Model, limit: float, threads: int) -> dict:
    """The row of ``model``: ``benchmarks.zoo.check`` run in a fresh process, killed after ``limit`` seconds."""
    command = [sys.executable, "-m", "benchmarks.zoo.check", model.name, "--threads", str(threads)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        out, problem = done.stdout, f"the process died (exit code {done.returncode}): {_last_line(done.stderr)}"
    except subprocess.TimeoutExpired as expired:
        out, problem = expired.stdout or "", f"timeout: over {limit:g} s"
    out = out.decode(errors="replace") if isinstance(out, bytes) else out
    lines = out.splitlines()
    if lines and lines[-1].startswith("{"):
        row = json.loads(lines[-1])
    else:  # killed or crashed: the stages it announced before the last one passed, the last one failed
        started = [line.split()[1] for line in lines if line.startswith("stage ")] or ["build"]
        row = {stage: "ok" for stage in started[:-1]}
        row.update({started[-1]: "fail", "causes": f"{started[-1]}: {problem}"})
        row["seconds"] = round(time.perf_counter() - start, 1)
    return {**{stage: "" for stage in STAGES}, **row, "name": model.name, "family": model.family,
            "params": model.params}


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"
