"""The ablation's summary (``python -m mmdc.ablate``): scores over seeds with confidence intervals, paired
differences between arms, and the regime figures that explain them, read from finished run directories.

Each (variant, seed) is one run directory ``<out>/<variant>-seed<k>``. Per variant, over seeds: the mean and
95 % confidence interval (t-distribution, n - 1 degrees of freedom; ``mmdc.eval.stats``) of the final score and
of every column of every benchmark, after the last iteration and per iteration. Per pair of arms (MmDC and plain
distillation, say): the difference per seed (the same seed gives both arms the same world, initial student and
data order), its mean and interval. Per arm and iteration, the regime: the student's accuracy on the cache pool
at the assessment, the hard ratio, how well the referee's difficulty ranks the student's mistakes (AUC), the
teacher's accuracy on hard and on easy instructions (graded against the world's truth, ``mmdc.world.outputs``),
and teacher answers spent per point of student accuracy gained.

    summary = write_summary(Path("runs/ablation"), variants, seeds=[0, 1, 2, 3, 4], pairs=[("mmdc", "plain")])
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdc.eval.harness import TABLE_DECIMALS, headline
from mmdc.eval.iteration import TEACHER, iterations, load_results
from mmdc.eval.stats import CONFIDENCE, interval, paired, rank_auc, ratio_of_means

SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"


@dataclass(frozen=True)
class Variant:
    """One arm of the ablation: a name (a folder name) and the config overrides that make it."""

    name: str
    overrides: tuple[str, ...] = ()


def run_dir(out: Path, variant: Variant, seed: int) -> Path:
    return out / f"{variant.name}-seed{seed}"


def run_status(path: Path) -> str:
    """ "new", "finished" or "unfinished" for a run directory."""
    state = path / "state.json"
    if not path.exists() or not any(path.iterdir()):
        return "new"
    try:
        return "finished" if json.loads(state.read_text()).get("status") == "finished" else "unfinished"
    except (OSError, ValueError):
        return "unfinished"


def phase_records(path: Path) -> list[dict]:
    """The phase lines of a run's ``metrics.jsonl`` (a line cut by a crash is skipped; the others still count)."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return []
    records = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("phase"):
            records.append(record)
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- scores


def _numeric(payload: dict) -> dict[str, float]:
    metrics = payload["metrics"]
    return {c: float(metrics[c]) for c in payload.get("columns", []) if _number(metrics.get(c))}


def curves(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """{benchmark: {iteration: {column: score}}} of one run: Figure 4 (the headline column) and, per column
    (the world's question families, say), where the student gained or did not."""
    return {
        benchmark: {k: cols for k, p in iterations(runs) if (cols := _numeric(p))}
        for benchmark, runs in load_results(path).items()
    }


def final_scores(path: Path) -> tuple[int | None, dict[str, dict[str, float]]]:
    """(last evaluated iteration, {benchmark: {column: score}}) of one run; (None, {}) if it has none."""
    last: int | None = None
    scores: dict[str, dict[str, float]] = {}
    for benchmark, curve in curves(path).items():
        if not curve:
            continue
        k = max(curve)
        last = k if last is None else max(last, k)
        scores[benchmark] = curve[k]
    return last, scores


# ----------------------------------------------------------------------------- what the loop did

# What each run's loop did, from its metrics.jsonl: (label, phase, key, how one number per run is
# made, decimals in the table).
PROCESS = (
    ("tuning rows per iteration", "teach", "rows", "mean", 1),  # teacher-answered rows the student tuned on
    ("teacher answers generated", None, "cache_misses", "sum", 1),  # teacher generations over the whole run
    ("hard ratio", "assess", "hard_ratio", "mean", 2),
    ("questions generated per iteration", "augment", "generated", "mean", 1),
    ("acceptance ratio", "augment", "acceptance_ratio", "mean", 2),
)


def process_stats(path: Path) -> dict[str, float]:
    """One number per ``PROCESS`` row for one run (mean over its iterations, or a sum): what the loop did,
    so that arms can be compared on their teacher budget and not only on their scores."""
    records = phase_records(path)
    out: dict[str, float] = {}
    for label, phase, key, how, _ in PROCESS:
        values = [float(r[key]) for r in records if (phase is None or r["phase"] == phase) and _number(r.get(key))]
        if values:
            out[label] = sum(values) if how == "sum" else statistics.fmean(values)
    return out


def parent_shares(path: Path) -> dict[int, float]:
    """{iteration: share of the cache pool the assessment sent to the augmentor (hard / assessed rows)} of a run.

    What plain distillation must draw at random to spend the same teacher budget (``--budget-from``): the same
    share gives the same number of parents, so the same number of new questions to answer."""
    return {
        int(r["iteration"]): r["hard"] / r["rows"]
        for r in phase_records(path)
        if r["phase"] == "assess" and _number(r.get("hard")) and _number(r.get("rows")) and r["rows"] > 0
    }


def measured_parent_shares(out: Path, variant: Variant, seeds: Sequence[int]) -> list[float] | None:
    """Per iteration (1..K), the mean over seeds of ``parent_shares`` of ``variant``'s runs, rounded to 4
    decimals; None when no run has an assessment yet. Iteration k averages the seeds that reached it."""
    by_k: dict[int, list[float]] = {}
    for seed in seeds:
        for k, share in parent_shares(run_dir(out, variant, seed)).items():
            by_k.setdefault(k, []).append(share)
    if not by_k:
        return None
    return [round(statistics.fmean(by_k[k]), 4) for k in sorted(by_k) if k >= 1]


# ----------------------------------------------------------------------------- the regime


# Per arm and iteration: (key, label, decimals). The first five are read at the assessment of iteration k (the
# student of iteration k on the cache pool), the last two at the evaluation of iteration k.
REGIME = (
    ("student_cache_accuracy", "student right on the cache pool, %", 1),
    ("hard_ratio", "hard ratio", 2),
    ("referee_auc", "referee AUC (difficulty vs student wrong)", 2),
    ("teacher_hard_accuracy", "teacher right among hard, %", 1),
    ("teacher_easy_accuracy", "teacher right among easy, %", 1),
    ("teacher_answers", "teacher answers so far", 0),
    ("gain", "student gain since iteration 0, points", 2),
)
PER_POINT = "teacher answers per point"  # ratio of the means of the last two REGIME rows


def teacher_answers_so_far(records: Sequence[dict], k: int) -> float:
    """Teacher answers generated (answer-store misses) before the evaluation of iteration ``k``: every phase of
    earlier iterations, and iteration k's teach (its assess and augment come after its evaluation)."""
    return float(
        sum(
            r["cache_misses"]
            for r in records
            if _number(r.get("cache_misses"))
            and _number(r.get("iteration"))
            and (r["iteration"] < k or (r["iteration"] == k and r["phase"] == "teach"))
        )
    )


def assessment_figures(graded: Any) -> dict[str, float]:
    """From ``mmdc.world.outputs.graded_assessment`` (one row per scored, readable cache-pool instruction): the
    student's accuracy, the referee's AUC for "the student is wrong" (difficulty as the score), and the teacher's
    accuracy on hard and on easy rows, in percent. A figure without rows to stand on is left out."""
    if graded is None or len(graded) == 0:
        return {}
    student_right = graded["student_right"].astype(bool)
    out = {"student_cache_accuracy": 100.0 * float(student_right.mean())}
    auc = rank_auc(graded["difficulty"].astype(float).tolist(), (~student_right).tolist())
    if auc is not None:
        out["referee_auc"] = auc
    hard = graded["hard"].astype(bool)
    for key, rows in (("teacher_hard_accuracy", hard), ("teacher_easy_accuracy", ~hard)):
        if rows.any():
            out[key] = 100.0 * float(graded.loc[rows, "teacher_right"].astype(bool).mean())
    return out


def run_regime(path: Path, score_curve: dict[int, float]) -> dict[int, dict[str, float]]:
    """{iteration k >= 1: {REGIME key: value}} of one run; ``score_curve`` is its headline score per iteration."""
    import pandas as pd

    from mmdc.world.outputs import assessment_files, graded_assessment, run_scenes

    records = phase_records(path)
    out: dict[int, dict[str, float]] = {}
    for r in records:
        if r["phase"] == "assess" and _number(r.get("iteration")):
            ratio = r.get("hard_ratio")
            if not _number(ratio) and _number(r.get("hard")) and _number(r.get("easy")) and r["hard"] + r["easy"]:
                ratio = r["hard"] / (r["hard"] + r["easy"])  # plain distillation: its random share
            if _number(ratio):
                out.setdefault(int(r["iteration"]), {})["hard_ratio"] = float(ratio)
    scenes = run_scenes(path)
    if scenes is not None:
        for k, parquet in assessment_files(path).items():
            figures = assessment_figures(graded_assessment(pd.read_parquet(parquet), scenes))
            out.setdefault(k, {}).update(figures)
    for k, score in score_curve.items():
        if k >= 1:
            out.setdefault(k, {})["teacher_answers"] = teacher_answers_so_far(records, k)
            if 0 in score_curve:
                out[k]["gain"] = score - score_curve[0]
    return dict(sorted(out.items()))


def regime_benchmark(benchmarks: Sequence[str]) -> str | None:
    """The benchmark whose headline measures the student's gain: the world's when the runs have it."""
    return "world" if "world" in benchmarks else (benchmarks[0] if benchmarks else None)


# ----------------------------------------------------------------------------- the summary


def build_summary(
    out: Path,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    pairs: Sequence[tuple[str, str]] = (),
    command: str | None = None,
) -> dict:
    """Collect every run's scores, process and regime figures and aggregate them per variant and pair (pure:
    reads the run directories only)."""
    summary: dict[str, Any] = {
        "command": command,
        "seeds": list(seeds),
        "confidence": CONFIDENCE,
        "variants": {},
        "pairs": {},
        "teacher": {},
        "benchmarks": {},
    }
    raw: dict[str, dict[int, dict[str, dict[int, dict[str, float]]]]] = {}  # variant -> seed -> curves
    finals: dict[str, dict[int, tuple[int | None, dict]]] = {}
    for variant in variants:
        per_seed: dict[str, Any] = {}
        raw[variant.name], finals[variant.name] = {}, {}
        missing = []
        for seed in seeds:
            path = run_dir(out, variant, seed)
            run_curves = curves(path) if path.exists() else {}
            last, scores = final_scores(path) if path.exists() else (None, {})
            if not scores:
                missing.append(seed)
                continue
            raw[variant.name][seed] = run_curves
            finished = run_status(path) == "finished"
            if finished:  # an interrupted run's last iteration is not a final score: its curve still counts
                finals[variant.name][seed] = (last, scores)
            per_seed[str(seed)] = {"iteration": last, "scores": scores, "finished": finished}
            for benchmark, cols in scores.items():
                order = summary["benchmarks"].setdefault(benchmark, [])
                order += [c for c in cols if c not in order]
            for benchmark, runs in load_results(path).items():
                if TEACHER in runs and benchmark not in summary["teacher"]:
                    summary["teacher"][benchmark] = _numeric(runs[TEACHER])
        summary["variants"][variant.name] = {
            "overrides": list(variant.overrides),
            "runs": per_seed,
            "missing_seeds": missing,
        }
    main = regime_benchmark(list(summary["benchmarks"]))
    for variant in variants:
        entry = summary["variants"][variant.name]
        runs = raw[variant.name]
        values: dict[str, dict[str, list[float]]] = {}
        for _, scores in finals[variant.name].values():
            for benchmark, cols in scores.items():
                for column, value in cols.items():
                    values.setdefault(benchmark, {}).setdefault(column, []).append(value)
        by_k: dict[str, dict[int, dict[str, list[float]]]] = {}
        for run_curves in runs.values():
            for benchmark, curve in run_curves.items():
                for k, cols in curve.items():
                    for column, value in cols.items():
                        by_k.setdefault(benchmark, {}).setdefault(k, {}).setdefault(column, []).append(value)
        per_column = {
            b: {str(k): {col: interval(v) for col, v in cols.items()} for k, cols in sorted(c.items())}
            for b, c in by_k.items()
        }
        process: dict[str, list[float]] = {}
        regime: dict[int, dict[str, list[float]]] = {}
        per_point: dict[int, tuple[list[float], list[float]]] = {}
        for seed, run_curves in runs.items():
            path = run_dir(out, variant, seed)
            for label, value in process_stats(path).items():
                process.setdefault(label, []).append(value)
            score_curve = {
                k: cols[headline(main)] for k, cols in run_curves.get(main, {}).items() if headline(main) in cols
            }
            for k, figures in run_regime(path, score_curve).items():
                for key, value in figures.items():
                    regime.setdefault(k, {}).setdefault(key, []).append(value)
                if "teacher_answers" in figures and "gain" in figures:
                    spent, gained = per_point.setdefault(k, ([], []))
                    spent.append(figures["teacher_answers"])
                    gained.append(figures["gain"])
        entry.update(
            final={b: {c: interval(v) for c, v in cols.items()} for b, cols in values.items()},
            per_iteration={
                b: {k: cols[headline(b)] for k, cols in c.items() if headline(b) in cols} for b, c in per_column.items()
            },  # Figure 4: the headline column alone
            per_iteration_columns=per_column,
            process={label: interval(v) for label, v in process.items()},
            regime={
                str(k): {
                    **{key: interval(v) for key, v in figures.items()},
                    **({PER_POINT: ratio_of_means(*per_point[k])} if k in per_point else {}),
                }
                for k, figures in sorted(regime.items())
            },
            regime_benchmark=main,
        )
    for a, b in pairs:
        if a in raw and b in raw:
            summary["pairs"][f"{a} - {b}"] = _pair(a, b, raw, finals)
    return summary


def _pair(a: str, b: str, raw: dict, finals: dict) -> dict:
    """Paired differences ``a - b`` by seed: after the last iteration (seeds where both arms reached the same one)
    and per iteration, for every benchmark and column."""
    final: dict[str, dict[str, Any]] = {}
    seeds = [s for s in finals[a] if s in finals[b] and finals[a][s][0] == finals[b][s][0]]
    last = {arm: {s: finals[arm][s][1] for s in seeds} for arm in (a, b)}  # {seed: {benchmark: {column: score}}}
    for benchmark in sorted({bm for s in seeds for bm in last[a][s]}):
        for column in sorted({c for s in seeds for c in last[a][s].get(benchmark, {})}):
            left, right = (
                {s: sc[benchmark][column] for s, sc in last[arm].items() if column in sc.get(benchmark, {})}
                for arm in (a, b)
            )
            result = paired(left, right)
            if result is not None:
                final.setdefault(benchmark, {})[column] = _with_arms(result, left, right)
    per_iteration: dict[str, dict[str, dict[str, Any]]] = {}
    for benchmark in sorted({bm for run_curves in raw[a].values() for bm in run_curves}):
        for k in sorted({k for run_curves in raw[a].values() for k in run_curves.get(benchmark, {})}):
            columns = {c for run_curves in raw[a].values() for c in run_curves.get(benchmark, {}).get(k, {})}
            for column in sorted(columns):
                left, right = _scores_at(raw[a], benchmark, k, column), _scores_at(raw[b], benchmark, k, column)
                result = paired(left, right)
                if result is not None:
                    cell = per_iteration.setdefault(benchmark, {}).setdefault(str(k), {})
                    cell[column] = _with_arms(result, left, right)
    return {"a": a, "b": b, "final": final, "per_iteration": per_iteration}


def _scores_at(runs: dict, benchmark: str, k: int, column: str) -> dict[int, float]:
    """{seed: score} of one arm's runs (``{seed: curves}``) in ``column`` at iteration ``k``."""
    return {seed: c[benchmark][k][column] for seed, c in runs.items() if column in c.get(benchmark, {}).get(k, {})}


def _with_arms(result: dict, left: dict, right: dict) -> dict:
    """A paired result with each seed's two scores beside the difference (keys as strings: JSON)."""
    return {
        **result,
        "per_seed": {str(s): {"a": left[s], "b": right[s], "diff": d} for s, d in result["per_seed"].items()},
    }


# ----------------------------------------------------------------------------- Markdown


def _cell(stats: dict | None, decimals: int) -> str:
    """``mean ± half-width`` of the interval (``mean`` alone for one seed); '–' for nothing."""
    if not stats:
        return "–"
    if stats.get("half") is None or math.isnan(stats["half"]):
        return f"{stats['mean']:.{decimals}f}"
    return f"{stats['mean']:.{decimals}f} ± {stats['half']:.{decimals}f}"


def _signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}"


def _diff_cell(stats: dict | None, decimals: int) -> str:
    """``+mean [low, high]``: the mean paired difference and its interval ('–' for nothing)."""
    if not stats:
        return "–"
    if stats.get("half") is None:
        return _signed(stats["mean"], decimals)
    return f"{_signed(stats['mean'], decimals)} [{_signed(stats['low'], decimals)}, {_signed(stats['high'], decimals)}]"


def _value(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(n: int) -> str:
    return "|" + "---|" * n


def render_summary(summary: dict) -> str:
    """The Markdown summary: the command; final score per benchmark (Tables 4/5) and every column; the headline
    and every column per iteration (Figure 4); the paired differences; the regime; what the loop did."""
    benchmarks = list(summary["benchmarks"])
    variants = summary["variants"]
    seeds = ", ".join(str(s) for s in summary["seeds"])
    level = round(100 * summary.get("confidence", CONFIDENCE))
    lines = ["# Ablation summary", ""]
    if summary.get("command"):
        lines += ["Reproduce every table below (finished runs are kept, interrupted ones resumed):", ""]
        lines += ["    " + summary["command"], ""]
    lines += [
        f"Seeds: {seeds}. Scores: the student's after the last iteration unless a table says otherwise; "
        f"`a ± h` is the mean over seeds and the half-width of its {level} % confidence interval (t-distribution, "
        "n - 1 degrees of freedom; a lone value has no interval); `n` is the number of finished seeds. "
        "The teacher row is the reference.",
        "",
    ]
    if not benchmarks:
        return "\n".join(lines + ["No run has evaluation results yet.", ""])

    head = ["variant", "overrides", "n", *[f"{b} {headline(b)}" for b in benchmarks]]
    lines += ["## Final score per benchmark (paper Tables 4 and 5)", "", _row(head), _rule(len(head))]
    for name, v in variants.items():
        cells = [_cell(v["final"].get(b, {}).get(headline(b)), TABLE_DECIMALS.get(b, 2)) for b in benchmarks]
        overrides = "`" + ", ".join(v["overrides"]) + "`" if v["overrides"] else "–"
        finished = sum(run["finished"] for run in v["runs"].values())
        lines.append(_row([name, overrides, str(finished), *cells]))
    teacher = summary["teacher"]
    if teacher:
        cells = [_value(teacher.get(b, {}).get(headline(b)), TABLE_DECIMALS.get(b, 2)) for b in benchmarks]
        lines.append(_row(["teacher (reference)", "–", "–", *cells]))
    lines.append("")

    for b in benchmarks:
        columns = summary["benchmarks"][b]
        decimals = TABLE_DECIMALS.get(b, 2)
        lines += [f"## {b}: every column", "", _row(["variant", *columns]), _rule(len(columns) + 1)]
        for name, v in variants.items():
            lines.append(_row([name, *[_cell(v["final"].get(b, {}).get(c), decimals) for c in columns]]))
        if b in teacher:
            lines.append(_row(["teacher (reference)", *[_value(teacher[b].get(c), decimals) for c in columns]]))
        lines.append("")
        ks = sorted({int(k) for v in variants.values() for k in v["per_iteration"].get(b, {})})
        if not ks:
            continue
        lines += [
            f"### {b} {headline(b)} per iteration (Figure 4)",
            "",
            _row(["variant", *[f"iteration {k}" for k in ks]]),
            _rule(len(ks) + 1),
        ]
        for name, v in variants.items():
            curve = v["per_iteration"].get(b, {})
            lines.append(_row([name, *[_cell(curve.get(str(k)), decimals) for k in ks]]))
        lines += ["", f"### {b}: every column per iteration", "", _row(["variant", "iteration", *columns])]
        lines.append(_rule(len(columns) + 2))
        for name, v in variants.items():
            for k, cols in v.get("per_iteration_columns", {}).get(b, {}).items():
                lines.append(_row([name, k, *[_cell(cols.get(c), decimals) for c in columns]]))
        lines.append("")

    lines += _render_pairs(summary, level)
    lines += _render_regime(summary)
    lines += _render_process(variants)

    gaps = [
        f"{name}: seeds {', '.join(map(str, v['missing_seeds']))}" for name, v in variants.items() if v["missing_seeds"]
    ]
    unfinished = [f"{name} seed {s}" for name, v in variants.items() for s, r in v["runs"].items() if not r["finished"]]
    if gaps:
        lines += ["Runs without results (failed or not run yet): " + "; ".join(gaps) + ".", ""]
    if unfinished:
        lines += [
            "Runs not finished (left out of the final scores; their curves count per iteration): "
            + ", ".join(unfinished)
            + ".",
            "",
        ]
    return "\n".join(lines)


def _render_pairs(summary: dict, level: int) -> list[str]:
    lines: list[str] = []
    for title, pair in summary.get("pairs", {}).items():
        a, b = pair["a"], pair["b"]
        lines += [
            f"## Paired difference {title} (same seed)",
            "",
            f"Each seed runs both arms on the same world, initial student and data order, so `{a} - {b}` per seed "
            f"removes what they share; `+d [low, high]` is the mean difference and its {level} % confidence interval. "
            "An interval that holds 0 does not tell the arms apart.",
            "",
        ]
        for benchmark, cols in pair["final"].items():
            column, decimals = headline(benchmark), TABLE_DECIMALS.get(benchmark, 2)
            if column not in cols:
                continue
            result = cols[column]
            lines += [
                f"### {benchmark} {headline(benchmark)} after the last iteration, per seed",
                "",
                _row(["seed", a, b, f"{a} - {b}"]),
                _rule(4),
            ]
            for seed, cells in result["per_seed"].items():
                lines.append(
                    _row(
                        [
                            seed,
                            _value(cells["a"], decimals),
                            _value(cells["b"], decimals),
                            _signed(cells["diff"], decimals),
                        ]
                    )
                )
            lines += [_row(["mean [CI]", "", "", _diff_cell(result, decimals)]), ""]
        for benchmark, per_k in pair["per_iteration"].items():
            decimals = TABLE_DECIMALS.get(benchmark, 2)
            columns = [c for c in summary["benchmarks"].get(benchmark, []) if any(c in cols for cols in per_k.values())]
            lines += [
                f"### {benchmark}: {a} - {b}, every column per iteration",
                "",
                _row(["iteration", "n", *columns]),
                _rule(len(columns) + 2),
            ]
            final = pair["final"].get(benchmark, {})
            if final:
                n = max(r["n"] for r in final.values())
                lines.append(_row(["final", str(n), *[_diff_cell(final.get(c), decimals) for c in columns]]))
            for k, cols in sorted(per_k.items(), key=lambda kv: int(kv[0])):
                n = max(r["n"] for r in cols.values())
                lines.append(_row([k, str(n), *[_diff_cell(cols.get(c), decimals) for c in columns]]))
            lines.append("")
    return lines


def _render_regime(summary: dict) -> list[str]:
    variants = summary["variants"]
    if not any(v.get("regime") for v in variants.values()):
        return []
    main = next((v.get("regime_benchmark") for v in variants.values() if v.get("regime_benchmark")), None)
    keys = [key for key, *_ in REGIME if any(key in f for v in variants.values() for f in v["regime"].values())]
    labels = {key: (label, decimals) for key, label, decimals in REGIME}
    lines = [
        "## The regime per arm and iteration",
        "",
        "Read at the assessment of iteration k (the student of iteration k on the cache pool, graded against the "
        "world's truth; scored rows the world can read): the student's accuracy, the hard ratio (plain distillation: "
        "its random share), the referee's AUC (how often the difficulty S of an instruction the student gets wrong "
        "is above that of one it gets right; 0.5 is chance), the teacher's accuracy on hard and on easy "
        "instructions. Read at the evaluation of iteration k: teacher answers generated so far (answer-store "
        f"misses), the student's gain in {main} {headline(main) if main else ''} since iteration 0, and teacher "
        "answers per point gained (the ratio of the two means). '–': not measured in that arm (plain distillation "
        "assesses nothing) or no rows to measure on.",
        "",
        _row(["variant", "iteration", *[labels[k][0] for k in keys], PER_POINT]),
        _rule(len(keys) + 3),
    ]
    for name, v in variants.items():
        for k, figures in v.get("regime", {}).items():
            cells = [_cell(figures.get(key), labels[key][1]) for key in keys]
            lines.append(_row([name, k, *cells, _value(figures.get(PER_POINT), 1)]))
    return lines + [""]


def _render_process(variants: dict) -> list[str]:
    places = {label: d for label, *_, d in PROCESS}
    labels = [label for label in places if any(label in v.get("process", {}) for v in variants.values())]
    if not labels:
        return []
    lines = [
        "## What the loop did (per run, then over seeds)",
        "",
        "Tuning rows: teacher-answered rows per tuning phase; teacher answers: generations over the "
        "whole run (cache misses); ratios and questions: mean over iterations.",
        "",
        _row(["variant", *labels]),
        _rule(len(labels) + 1),
    ]
    for name, v in variants.items():
        lines.append(_row([name, *[_cell(v.get("process", {}).get(label), places[label]) for label in labels]]))
    return lines + [""]


def write_summary(
    out: Path,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    pairs: Sequence[tuple[str, str]] = (),
    command: str | None = None,
) -> dict:
    """Build, then write ``summary.md`` and ``summary.json`` into ``out``."""
    summary = build_summary(out, variants, seeds, pairs, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / SUMMARY_MD).write_text(render_summary(summary), encoding="utf-8")
    return summary


__all__ = [
    "PER_POINT",
    "PROCESS",
    "REGIME",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "Variant",
    "assessment_figures",
    "build_summary",
    "curves",
    "final_scores",
    "measured_parent_shares",
    "parent_shares",
    "phase_records",
    "process_stats",
    "render_summary",
    "run_dir",
    "run_regime",
    "run_status",
    "teacher_answers_so_far",
    "write_summary",
]
