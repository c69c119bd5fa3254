"""``report.md``: what a run did, per iteration, from its ``metrics.jsonl``.

The report is derived data: it can be rebuilt at any time from the run directory, e.g.
``python -c "from mmdc.report import write_report; from mmdc.rundir import RunDir; write_report(RunDir('runs/x'))"``.
"""

from __future__ import annotations

from mmdc.rundir import RunDir, atomic_write_text

PHASE_COLUMNS = {
    "teach": ["rows", "conversations", "cache_hits", "cache_misses", "wall_s", "rows_per_s"],
    "tune": ["train_first_loss", "train_final_loss", "train_steps", "train_samples", "wall_s"],
    "assess": ["rows", "hard", "easy", "unscored", "hard_ratio", "cache_hits", "wall_s", "rows_per_s"],
    "augment": ["rows", "generated", "accepted", "acceptance_ratio", "easy_sampled", "tuning_after", "cache_after",
                "wall_s"],
}


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(metrics: list[dict], title: str) -> str:
    lines = [f"# MmDC run `{title}`", ""]
    phases = [m for m in metrics if "phase" in m]
    for m in phases:
        if m["phase"] in ("prepare", "align"):
            items = ", ".join(f"{k}={_fmt(v)}" for k, v in m.items() if k not in ("time", "phase", "iteration"))
            lines.append(f"- **{m['phase']}**: {items}")
    lines.append("")
    for phase, cols in PHASE_COLUMNS.items():
        rows = [m for m in phases if m["phase"] == phase]
        if not rows:
            continue
        lines += [f"## {phase}", "", "| iteration | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for m in rows:
            lines.append(f"| {m['iteration']} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
        lines.append("")
    rejected = [m for m in phases if m["phase"] == "augment" and m.get("rejected")]
    if rejected:
        lines += ["## rejected candidates by reason", ""]
        for m in rejected:
            lines.append(f"- iteration {m['iteration']}: " + ", ".join(f"{k}: {v}" for k, v in m["rejected"].items()))
        lines.append("")
    total = sum(m.get("wall_s", 0) for m in phases)
    lines.append(f"Total phase wall time: {total:.1f} s.")
    return "\n".join(lines) + "\n"


def write_report(rd: RunDir) -> None:
    atomic_write_text(rd.report, render(rd.read_metrics(), rd.root.name))
