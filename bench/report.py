"""Rows of the result table, and the table as Markdown and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import summary


@dataclass
class Row:
    """One figure: morag's value, the baseline measured in the same run, the ratio."""

    key: str  # stable id, e.g. "1a"
    figure: str
    unit: str
    value: dict[str, Any]  # summary(): median, min, max of repetitions
    baseline_name: str = ""
    baseline: dict[str, Any] | None = None
    ratio: dict[str, Any] | None = None  # summary() of paired per-repetition ratios
    target: str = ""
    met: bool | None = None  # None: nothing to judge ("reported")
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def paired_ratios(values: list[float], baselines: list[float]) -> dict[str, Any]:
    """Ratio of each repetition to the baseline repetition it was interleaved with."""
    pairs = [v / b for v, b in zip(values, baselines, strict=False) if b]
    return summary(pairs, digits=3)


def skipped(key: str, figure: str, reason: str, target: str = "") -> Row:
    return Row(
        key=key,
        figure=figure,
        unit="",
        value=summary([]),
        target=target,
        met=None,
        notes=f"not measured: {reason}",
    )


def _fmt(number: float | None) -> str:
    if number is None:
        return "—"
    magnitude = abs(number)
    if magnitude >= 100:
        return f"{number:,.0f}"
    if magnitude >= 10:
        return f"{number:.1f}"
    if magnitude >= 1:
        return f"{number:.2f}"
    return f"{number:.3g}"


def fmt_summary(s: dict[str, Any] | None) -> str:
    if s and s.get("lower_bound_s") is not None:
        return f"≥ {s['lower_bound_s']:,} s (not redelivered in the {s['watched_s']} s watched)"
    if not s or s.get("median") is None:
        return "—"
    if s.get("n", 0) <= 1:
        return _fmt(s["median"])
    return f"{_fmt(s['median'])} ({_fmt(s['min'])}–{_fmt(s['max'])})"


def verdict(row: Row) -> str:
    if row.met is None:
        return "reported" if row.value.get("median") is not None else "—"
    return "met" if row.met else "**not met**"


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| # | figure | morag: median (min–max) | baseline (same run): median (min–max) "
        "| ratio: median (min–max) | target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        unit = f" {row.unit}" if row.unit else ""
        base = ""
        if row.baseline_name:
            base = f"{row.baseline_name}: {fmt_summary(row.baseline)}"
        lines.append(
            f"| {row.key} | {row.figure} | {fmt_summary(row.value)}{unit} | {base or '—'} "
            f"| {fmt_summary(row.ratio)} | {row.target or '—'} | {verdict(row)} |"
        )
    return "\n".join(lines)


def notes_section(rows: list[Row]) -> str:
    lines = []
    for row in rows:
        if row.notes:
            lines.append(f"- **{row.key}** {row.notes}")
    return "\n".join(lines)


def write_results(
    directory: Path, rows: list[Row], meta: dict[str, Any], stem: str = "latest"
) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    json_path.write_text(
        json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2, default=str) + "\n"
    )
    settings_lines = "\n".join(f"- {k}: {v}" for k, v in meta.get("settings", {}).items())
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    md = [
        "# morag benchmark results",
        "",
        f"Run {meta.get('started_at')} of morag {meta.get('git_commit')} on "
        f"{meta.get('machine')}; "
        f"{meta.get('duration_seconds')} s; command `{meta.get('command')}`.",
        "",
        "Each figure is the median of its repetitions with min and max; every baseline is "
        "measured in the same run, interleaved with morag's repetitions, and the ratio is "
        "the median of the paired per-repetition ratios. The machine is shared: absolute "
        "figures drift from run to run, ratios much less.",
        "",
        markdown_table(rows),
        "",
        "## Notes",
        "",
        notes_section(rows),
        "",
        "## Versions",
        "",
        versions,
        "",
        "## Settings",
        "",
        settings_lines,
        "",
    ]
    md_path.write_text("\n".join(md))
    return json_path, md_path
