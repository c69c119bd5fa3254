"""``report.md``: what a run did and how good its student got, per iteration.

Two sources, both in the run directory: ``metrics.jsonl`` (one line per phase:
rows, throughput, hard ratio, acceptance, loss) and ``eval/<benchmark>/*.json``
(``mmdc.eval.iteration``: the student after each iteration and the teacher as
the reference; ``scienceqa/finetuned.json``: Table 1's fine-tuned student,
``mmdc.eval.finetune``). The report tells the story first: student against teacher per
iteration (one headline table, the Figure-4-style plot ``plots/eval_per_iteration.png``
with one line per column and the teacher dashed, then a table per benchmark); then what
calibration did per iteration (hard ratio, accepted questions, why candidates were
rejected); then Table 1's fine-tune, if any; then the phase tables.

The report is derived data: it can be rebuilt at any time from the run directory, e.g.
``python -c "from mmdc.report import write_report; from mmdc.rundir import RunDir; write_report(RunDir('runs/x'))"``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from mmdc.rundir import RunDir, atomic_write_text

log = logging.getLogger("mmdc.report")

PLOT_FILE = Path("plots") / "eval_per_iteration.png"  # relative to the run directory (and so to report.md)

PHASE_COLUMNS = {
    "teach": ["rows", "conversations", "cache_hits", "cache_misses", "wall_s", "rows_per_s"],
    "tune": ["train_first_loss", "train_final_loss", "train_steps", "train_samples", "wall_s"],
    "assess": ["rows", "hard", "easy", "unscored", "hard_ratio", "cache_hits", "wall_s", "rows_per_s"],
    "finetune": ["rows", "text_only", "skipped", "train_steps", "train_first_loss", "train_final_loss", "wall_s"],
    "augment": [
        "rows",
        "generated",
        "accepted",
        "acceptance_ratio",
        "easy_sampled",
        "tuning_after",
        "cache_after",
        "wall_s",
    ],
}
BENCHMARK_TITLES = {
    "world": "World test split, free-form (accuracy %, by question family)",
    "world_mc": "World test split, multiple choice in ScienceQA format (accuracy %)",
    "scienceqa": "ScienceQA (accuracy %, paper Table 1 columns)",
    "seed": "SEED-Bench, image (accuracy %, paper Table 2 columns)",
    "llavabench": "LLaVA-Bench (relative score, paper Table 3 columns)",
}
_COUNT_KEYS = ("failed", "unparsed")  # replies no rule could read: worth seeing beside the score


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------- evaluation


def _rows(runs: dict[str, dict]) -> list[tuple[str, dict]]:
    """(row label, results payload): the teacher first as the reference, then the student by iteration."""
    from mmdc.eval.iteration import TEACHER, iterations

    rows = [("teacher (reference)", runs[TEACHER])] if TEACHER in runs else []
    return rows + [(f"iteration {k}", payload) for k, payload in iterations(runs)]


def _columns(runs: dict[str, dict]) -> list[str]:
    """Score columns of a benchmark, in the first result's order, then any later ones (a dimension seen later)."""
    columns: list[str] = []
    for _, payload in _rows(runs):
        columns += [c for c in payload.get("columns", []) if c not in columns]
    return columns


def headline_table(results: dict[str, dict[str, dict]]) -> list[str]:
    """Markdown lines: one row per model (teacher, then iteration 0..K), per benchmark its headline score and the
    student's share of the teacher's (the question a run answers first: how close did the student get?)."""
    from mmdc.eval.harness import TABLE_DECIMALS, headline
    from mmdc.eval.iteration import TEACHER, iterations

    benchmarks = [b for b, runs in results.items() if _rows(runs)]
    if not benchmarks:
        return []
    head = ["model"]
    for b in benchmarks:
        head += [f"{b} {headline(b)}"] + (["% of teacher"] if TEACHER in results[b] else [])
    ks = sorted({k for b in benchmarks for k, _ in iterations(results[b])})
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    teacher_row = [("teacher (reference)", None)] if any(TEACHER in results[b] for b in benchmarks) else []
    for label, k in teacher_row + [(f"iteration {k}", k) for k in ks]:
        cells = [label]
        for b in benchmarks:
            runs, column, decimals = results[b], headline(b), TABLE_DECIMALS.get(b, 2)
            payload = runs.get(TEACHER) if k is None else dict(iterations(runs)).get(k)
            value = _value(payload, column) if payload else math.nan
            cells.append("–" if math.isnan(value) else f"{value:.{decimals}f}")
            if TEACHER in runs:
                teacher = _value(runs[TEACHER], column)
                share = 100 * value / teacher if teacher and not math.isnan(value) else math.nan
                cells.append("–" if math.isnan(share) else f"{share:.0f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def eval_section(results: dict[str, dict[str, dict]], plot: Path | None = None) -> list[str]:
    """Markdown lines: student against teacher per iteration (headline table, plot), then a table per benchmark
    (rows: teacher, iteration 0..K) with every column."""
    from mmdc.eval.harness import TABLE_DECIMALS
    from mmdc.eval.report import markdown_table

    if not results:
        return []
    lines = [
        "## Student vs teacher per iteration",
        "",
        "Iteration 0 is the student after stage 1 (alignment), before any distillation; "
        "the teacher row is the reference (eval/<benchmark>/*.json, *.samples.jsonl per sample).",
        "",
        *headline_table(results),
    ]
    if plot is not None:
        lines += [f"![accuracy per iteration]({plot.as_posix()})", ""]
    for benchmark, runs in results.items():
        rows = _rows(runs)
        if not rows:
            continue
        columns = _columns(runs)
        table_rows = [{"model": label, **payload["metrics"]} for label, payload in rows]
        lines += [
            f"### {BENCHMARK_TITLES.get(benchmark, benchmark)}",
            "",
            markdown_table(columns, table_rows, label="model", decimals=TABLE_DECIMALS.get(benchmark, 2)),
        ]
        n = {payload["metrics"].get("n") for _, payload in rows} - {None}
        notes = [f"n = {', '.join(str(v) for v in sorted(n))} per model"] if n else []
        for key in _COUNT_KEYS:
            counts = [(label, payload["metrics"][key]) for label, payload in rows if key in payload["metrics"]]
            if any(v for _, v in counts):
                notes.append(f"{key} (counted wrong): " + ", ".join(f"{label} {v}" for label, v in counts))
        if notes:
            lines += ["; ".join(notes) + ".", ""]
    return lines


def finetuned_section(finetuned: dict | None, zero_shot: dict[str, dict] | None = None) -> list[str]:
    """Markdown lines: paper Table 1, the fine-tuned student (``eval/scienceqa/finetuned.json``) above the zero-shot
    student of the last iteration (``zero_shot``: the run's ScienceQA results, when it evaluated ScienceQA)."""
    from mmdc.eval.iteration import iterations
    from mmdc.eval.report import count_lines, markdown_table

    if not finetuned:
        return []
    setup = finetuned.get("meta", {}).get("finetune", {})
    rows = [{"model": "fine-tuned on the train split", **finetuned["metrics"]}]
    last = iterations(zero_shot or {})[-1:]
    rows += [{"model": f"zero-shot (iteration {k})", **payload["metrics"]} for k, payload in last]
    return [
        "## ScienceQA after fine-tuning on its train split (paper Table 1)",
        "",
        f"The final student fine-tuned for {setup.get('epochs')} epochs at lr {setup.get('lr')} on "
        f"`{setup.get('data')}`, then scored on the test split (eval/scienceqa/finetuned.json).",
        "",
        markdown_table(finetuned.get("columns", []), rows, label="model", decimals=2),
        "; ".join(count_lines(finetuned["metrics"])) + ".",
        "",
    ]


def _value(payload: dict, column: str) -> float:
    value = payload["metrics"].get(column)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def plot_eval(results: dict[str, dict[str, dict]], path: Path) -> Path | None:
    """Figure 4 of the paper for this run: a panel per benchmark, a line per column against iteration.

    The teacher is a dashed horizontal line in its column's colour; the overall
    column is drawn thicker. Uses matplotlib's Agg canvas directly (no pyplot,
    no global backend switch). Returns ``path``, or None when there is nothing
    to plot or matplotlib is missing (the tables still say everything).
    """
    from mmdc.eval.harness import headline
    from mmdc.eval.iteration import TEACHER, iterations

    panels = [(b, runs) for b, runs in results.items() if iterations(runs)]
    if not panels:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        log.warning("matplotlib is not installed: report.md has no plot")
        return None

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for index, (benchmark, runs) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        points = iterations(runs)
        xs = [k for k, _ in points]
        scored = [p for _, p in points] + ([runs[TEACHER]] if TEACHER in runs else [])
        columns = [c for c in _columns(runs) if any(not math.isnan(_value(p, c)) for p in scored)]
        colors = _palette(len(columns))
        for column, color in zip(columns, colors):
            main = column == headline(benchmark)
            ax.plot(
                xs,
                [_value(p, column) for _, p in points],
                marker="o",
                color=color,
                label=column,
                linewidth=2.6 if main else 1.3,
                zorder=3 if main else 2,
            )
            if TEACHER in runs and not math.isnan(_value(runs[TEACHER], column)):
                ax.axhline(
                    _value(runs[TEACHER], column),
                    color=color,
                    linestyle="--",
                    linewidth=1.6 if main else 0.9,
                    alpha=0.8,
                )
        ax.set_title(benchmark)
        ax.set_xlabel("iteration (0 = after stage 1)")
        ax.set_ylabel("relative score" if benchmark == "llavabench" else "accuracy (%)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", title="dashed: teacher" if TEACHER in runs else None, title_fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _palette(n: int) -> list:
    """Distinct colours: tab10 up to 10 lines, tab20 beyond."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------- the report


def _ratio(numerator, denominator) -> str:
    return f"{numerator / denominator:.2f}" if isinstance(numerator, (int, float)) and denominator else "–"


def calibration_section(phases: list[dict]) -> list[str]:
    """Markdown lines: per iteration, what the assessment found (hard / easy, the hard ratio) and what the augmentor
    made of it (parents, candidates, accepted questions, rejected candidates by reason, most frequent first)."""
    assess = {m["iteration"]: m for m in phases if m["phase"] == "assess"}
    augment = {m["iteration"]: m for m in phases if m["phase"] == "augment"}
    if not assess and not augment:
        return []
    lines = [
        "## Calibration per iteration",
        "",
        "Hard ratio: hard among the scored cache-pool instructions (Eq. 6, hard iff S >= tau); each hard "
        "instruction is a parent the augmentor writes one new question for; accepted: candidates that passed the "
        "ROUGE-L and shape checks and joined the pools.",
        "",
        "| iteration | assessed | hard | easy | unscored | hard ratio | parents | candidates | accepted "
        "| acceptance ratio | rejected, by reason |",
        "|" + "---|" * 11,
    ]
    random = False
    for k in sorted(set(assess) | set(augment)):
        a, g = assess.get(k, {}), augment.get(k, {})
        random = random or a.get("selection") == "random"
        hard, easy = a.get("hard"), a.get("easy")
        ratio = a.get("hard_ratio")
        if ratio is None and isinstance(hard, int) and isinstance(easy, int):
            ratio = hard / (hard + easy) if hard + easy else None
        reasons = sorted((g.get("rejected") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        cells = [
            k,
            a.get("rows"),
            hard,
            easy,
            a.get("unscored"),
            ratio,
            g.get("rows"),
            g.get("generated"),
            g.get("accepted"),
            g.get("acceptance_ratio"),
            ", ".join(f"{reason} {n}" for reason, n in reasons) or ("none" if g else None),
        ]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    lines.append("")
    if random:
        lines += ["Parents drawn at random (`calibration.selection: random`, plain distillation): no referee.", ""]
    return lines


def phase_section(phases: list[dict]) -> list[str]:
    """Markdown lines: prepare/align facts, then one table per phase with a row per iteration."""
    lines = ["## Phases", ""]
    for m in phases:
        if m["phase"] in ("prepare", "align"):
            items = ", ".join(f"{k}={_fmt(v)}" for k, v in m.items() if k not in ("time", "phase", "iteration"))
            lines.append(f"- **{m['phase']}**: {items}")
    lines.append("")
    for phase, cols in PHASE_COLUMNS.items():
        rows = [m for m in phases if m["phase"] == phase]
        if not rows:
            continue
        lines += [f"### {phase}", "", "| iteration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for m in rows:
            lines.append(f"| {m['iteration']} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
        lines.append("")
    return lines


def render(
    metrics: list[dict],
    title: str,
    evals: dict[str, dict[str, dict]] | None = None,
    plot: Path | None = None,
    finetuned: dict | None = None,
) -> str:
    """The whole report.md: student vs teacher per iteration, calibration per iteration, Table 1's fine-tune (if
    any), then the phase tables."""
    phases = [m for m in metrics if "phase" in m]
    lines = [f"# MmDC run `{title}`", ""]
    lines += eval_section(evals or {}, plot)
    lines += calibration_section(phases)
    lines += finetuned_section(finetuned, (evals or {}).get("scienceqa"))
    lines += phase_section(phases)
    total = sum(m.get("wall_s", 0) for m in phases)
    lines.append(f"Total phase wall time: {total:.1f} s.")
    return "\n".join(lines) + "\n"


def write_report(run_dir: RunDir) -> Path:
    """Rebuild report.md (and the evaluation plot) from the run directory; returns the report's path."""
    from mmdc.eval.finetune import finetuned_path
    from mmdc.eval.iteration import load_results
    from mmdc.eval.report import read_results

    evals = load_results(run_dir.root)
    plot = plot_eval(evals, run_dir.root / PLOT_FILE) if evals else None
    finetuned = read_results(finetuned_path(run_dir.root)) if finetuned_path(run_dir.root).exists() else None
    plot_link = plot.relative_to(run_dir.root) if plot else None
    atomic_write_text(run_dir.report, render(run_dir.read_metrics(), run_dir.root.name, evals, plot_link, finetuned))
    return run_dir.report


__all__ = [
    "PLOT_FILE",
    "calibration_section",
    "eval_section",
    "finetuned_section",
    "headline_table",
    "phase_section",
    "plot_eval",
    "render",
    "write_report",
]
