"""The sweep's results as Markdown: pass rates per library, every failure grouped by cause, the rewrites' rounding
error and the scores' agreement with the plain loop, and pass rates per family."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict

from benchmarks.zoo.check import CORE, NEAR, STAGES, TOLERANCE

SHOWN = 6  # model names listed per failure cause


def passed(row: dict, stages=CORE) -> bool:
    return all(row[stage] == "ok" for stage in stages)


def summary(rows: list[dict]) -> str:
    """All sections, for ``docs/coverage.md``."""
    return "\n\n".join([totals(rows), failures(rows), rounding(rows), families(rows)])


def totals(rows: list[dict]) -> str:
    """Per library: how many models pass the core stages, and TorchScript and torch.export on top of them, and how
    many were traced by the second route (torch.export, where torch.fx fails or mis-traces)."""
    lines = ["| library | models | trace+analyze+rewrite+equivalence | + TorchScript | + torch.export | "
             "traced by torch.export | median time |", "|---|---|---|---|---|---|---|"]
    for library, group in _by(rows, lambda row: row["name"].split("/")[0]).items():
        seconds = statistics.median(float(row["seconds"]) for row in group)
        second = sum(row.get("route") == "export" for row in group)
        lines.append(f"| {library} | {len(group)} | {_rate(group, CORE)} | {_rate(group, (*CORE, 'torchscript'))} "
                     f"| {_rate(group, (*CORE, 'export'))} | {second} | {seconds:.0f} s |")
    return "\n".join(lines)


def failures(rows: list[dict]) -> str:
    """Every failure, grouped by stage and cause (quoted names and numbers set aside), with the models it hit."""
    groups = defaultdict(list)
    for row in rows:
        for failure in filter(None, re.split(f"; (?=(?:{'|'.join(STAGES)}): )", row["causes"])):
            stage, _, text = failure.partition(": ")
            groups[stage, _pattern(text)].append((row["name"], text))
    if not groups:
        return "No failures."
    lines = ["| stage | cause | models |", "|---|---|---|"]
    for (stage, _), hits in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        names = ", ".join(name for name, _ in hits[:SHOWN]) + (f", … ({len(hits)} in all)" if len(hits) > SHOWN else "")
        example = hits[0][1].replace("|", "\\|")
        lines.append(f"| {stage} | {example} | {names} |")
    return "\n".join(lines)


def rounding(rows: list[dict]) -> str:
    """How far the rewrites with copied weights land from the original, over the models that pass equivalence."""
    errors = [float(row["max_error"]) for row in rows if row.get("max_error")]
    if not errors:
        return "No model reached the equivalence check."
    bins = [("exactly 0", lambda e: e == 0), ("(0, 1e-6]", lambda e: 0 < e <= 1e-6),
            ("(1e-6, 1e-5]", lambda e: 1e-6 < e <= 1e-5), (f"(1e-5, {TOLERANCE:g}]", lambda e: 1e-5 < e)]
    lines = ["| worst relative error of a model's rewrites | models |", "|---|---|"]
    lines += [f"| {label} | {sum(map(test, errors))} |" for label, test in bins]
    compared = [row["plain_loop"] for row in rows if row.get("plain_loop")]
    near = len([verdict for verdict in compared if verdict != "equal"])
    lines += ["", f"analyze's scores equal the plain per-task loop's, layer by layer, on {len(compared) - near} of the "
                  f"{len(compared)} models compared"
                  + (f"; on {near} more they differ only where a cosine lies within {NEAR:g} of S." if near else ".")]
    return "\n".join(lines)


def families(rows: list[dict]) -> str:
    """Pass rates per family."""
    lines = ["| family | models | core | + TorchScript | + torch.export |", "|---|---|---|---|---|"]
    for family, group in sorted(_by(rows, lambda row: f"{row['name'].split('/')[0]}/{row['family']}").items()):
        lines.append(f"| {family} | {len(group)} | {_count(group, CORE)} | {_count(group, (*CORE, 'torchscript'))} "
                     f"| {_count(group, (*CORE, 'export'))} |")
    return "\n".join(lines)


def _by(rows: list[dict], key) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return dict(groups)


def _count(rows: list[dict], stages) -> int:
    return sum(passed(row, stages) for row in rows)


def _rate(rows: list[dict], stages) -> str:
    n = _count(rows, stages)
    return f"{n} ({100 * n / len(rows):.1f}%)"


def _pattern(text: str) -> str:
    """``text`` without what names a particular model: quoted strings, numbers."""
    return re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "…", text))
