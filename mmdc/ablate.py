"""``python -m mmdc.ablate``: the paper's ablations (Tables 4 and 5) and plain distillation, over seeds.

    python -m mmdc.ablate --config configs/tiny.yaml --out runs/ablation --seeds 0,1,2
    python -m mmdc.ablate --config configs/tiny.yaml --out runs/ablation --preset table4
    python -m mmdc.ablate --out runs/ablation --variant lr_hi:tune.lr=3e-3,tune.epochs=3 --preset mmdc
    python -m mmdc.ablate --out runs/ablation --summarize-only        # rebuild summary.md from finished runs

Each variant is a name and config overrides; each (variant, seed) is one ordinary
run (``mmdc.run.main``, in this process, one Ray cluster for all of them) in its
own directory ``<out>/<variant>-seed<k>``. A finished run is skipped and an
interrupted one resumed (``--resume``), so the command can simply be run again
after a crash. Every variant's config is validated before the first run starts.

Built-in presets (``--preset``; groups ``table4``, ``table5``, ``plain``, ``all``):

    mmdc        calibration.tau=0.33              the paper's setting: the reference row
    tau_0       calibration.tau=0                 every instruction hard: no easy ones (Table 4)
    tau_0.67    calibration.tau=0.67              (Table 4)
    tau_1       calibration.tau=1                 almost everything easy (Table 4)
    no_stage1   align.enabled=false               without multimodal alignment (Table 5)
    plain       calibration.selection=random      plain distillation: no assessment, random parents (issue 9)

The summary (``<out>/summary.md`` and ``summary.json``) has one row per variant:
mean ± standard deviation over seeds of the final iteration's score per
benchmark (the paper's one-number Tables 4/5), then every column per benchmark,
then the headline score per iteration (Figure 4 over seeds) and every column
per iteration; the teacher's score is the reference row.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRESETS: dict[str, tuple[str, ...]] = {
    "mmdc": ("calibration.tau=0.33",),
    "tau_0": ("calibration.tau=0",),
    "tau_0.67": ("calibration.tau=0.67",),
    "tau_1": ("calibration.tau=1",),
    "no_stage1": ("align.enabled=false",),
    "plain": ("calibration.selection=random",),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "table4": ("tau_0", "mmdc", "tau_0.67", "tau_1"),  # the paper's tau ablation, in its row order
    "table5": ("mmdc", "no_stage1"),  # with and without stage 1
    "plain": ("mmdc", "plain"),  # MmDC against plain distillation (issue 9)
    "all": tuple(PRESETS),
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a variant name is a directory name
_KEY = re.compile(r"^[A-Za-z_][\w.]*$")  # a dotted config key
_OVERRIDE_SPLIT = re.compile(r",\s*(?=[A-Za-z_][\w.]*\s*=)")  # a comma that starts the next key=value
SUMMARY_MD, SUMMARY_JSON = "summary.md", "summary.json"


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table: a name and the config overrides that make it."""

    name: str
    overrides: tuple[str, ...] = ()


def parse_variant(text: str) -> Variant:
    """``NAME:key=value[,key=value]`` (or a preset's name alone) -> Variant.

    A comma separates overrides only where the next ``key=`` starts, so a value
    may hold commas itself (``data.x=[1, 2]``).
    """
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"variant {text!r}: the name must be letters, digits, '_', '.' or '-' (it names a folder)")
    if not sep:
        if name in PRESETS:
            return Variant(name, PRESETS[name])
        raise ValueError(f"variant {text!r}: write NAME:key=value[,key=value], or a preset ({', '.join(PRESETS)})")
    overrides = tuple(part.strip() for part in _OVERRIDE_SPLIT.split(rest) if part.strip())
    if not overrides:
        raise ValueError(f"variant {text!r}: no overrides after ':'")
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not _KEY.match(key.strip()):
            raise ValueError(f"variant {text!r}: override {item!r} must look like key.path=value")
    return Variant(name, overrides)


def resolve_variants(presets: Sequence[str], variants: Sequence[str]) -> list[Variant]:
    """Presets (names or groups) then explicit variants, in order, each name once; all presets when none given."""
    chosen: list[Variant] = []
    for item in presets:
        if item in GROUPS:
            chosen += [Variant(n, PRESETS[n]) for n in GROUPS[item]]
        elif item in PRESETS:
            chosen.append(Variant(item, PRESETS[item]))
        else:
            raise ValueError(f"unknown preset {item!r} (presets: {', '.join(PRESETS)}; groups: {', '.join(GROUPS)})")
    chosen += [parse_variant(v) for v in variants]
    if not chosen:
        chosen = [Variant(n, PRESETS[n]) for n in GROUPS["all"]]
    unique: dict[str, Variant] = {}
    for v in chosen:
        if v.name in unique and unique[v.name] != v:
            raise ValueError(f"variant name {v.name!r} is used twice with different overrides")
        unique.setdefault(v.name, v)
    return list(unique.values())


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2] (distinct, in order)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: a comma-separated list of integers") from None
    if not seeds:
        raise ValueError("--seeds: at least one seed")
    return list(dict.fromkeys(seeds))


def run_dir(out: Path, variant: Variant, seed: int) -> Path:
    return out / f"{variant.name}-seed{seed}"


def run_overrides(variant: Variant, seed: int, base: Sequence[str] = ()) -> list[str]:
    """What one run sets on top of the config: the shared overrides, the variant's, then the seed and name."""
    return [*base, *variant.overrides, f"run.seed={seed}", f"run.name={variant.name}-seed{seed}"]


# ----------------------------------------------------------------------------- running


def _status(path: Path) -> str:
    """ "new", "finished" or "unfinished" for a run directory."""
    state = path / "state.json"
    if not path.exists() or not any(path.iterdir()):
        return "new"
    try:
        return "finished" if json.loads(state.read_text()).get("status") == "finished" else "unfinished"
    except (OSError, ValueError):
        return "unfinished"


def plan(
    out: Path,
    config: str | None,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    base: Sequence[str] = (),
    ray_args: Sequence[str] = (),
) -> list[tuple[Path, str, list[str]]]:
    """(run directory, status, argv for ``mmdc.run.main``) for every variant x seed."""
    steps = []
    for variant in variants:
        for seed in seeds:
            path = run_dir(out, variant, seed)
            status = _status(path)
            if status == "unfinished":
                argv = ["--resume", str(path), *ray_args]
            else:
                argv = (["--config", config] if config else []) + ["--output", str(path), *ray_args]
                for item in run_overrides(variant, seed, base):
                    argv += ["--set", item]
            steps.append((path, status, argv))
    return steps


def validate(config: str | None, variants: Sequence[Variant], seeds: Sequence[int], base: Sequence[str]) -> None:
    """Load every variant's config now: a typo fails in a second, not after hours of earlier runs."""
    from mmdc.config import load_config

    for variant in variants:
        load_config(config, run_overrides(variant, seeds[0], base))


def run_all(steps: Sequence[tuple[Path, str, list[str]]], runner: Callable[[list[str]], int]) -> list[dict]:
    """Run the steps one after another; a failed run is recorded and the others still run."""
    outcomes = []
    for path, status, argv in steps:
        if status == "finished":
            print(f"[ablate] {path.name}: finished earlier, kept", flush=True)
            outcomes.append({"run": path.name, "rc": 0, "skipped": True})
            continue
        print(f"[ablate] {path.name}: {'resuming' if status == 'unfinished' else 'starting'}", flush=True)
        try:
            rc = runner(argv)
        except Exception as err:  # noqa: BLE001 - one bad run must not lose the others
            print(f"[ablate] {path.name}: failed: {err}", file=sys.stderr, flush=True)
            rc = 1
        outcomes.append({"run": path.name, "rc": rc, "skipped": False})
    return outcomes


# ----------------------------------------------------------------------------- summary


def final_scores(path: Path) -> tuple[int | None, dict[str, dict[str, float]]]:
    """(last evaluated iteration, {benchmark: {column: score}}) of one run; (None, {}) if it has none."""
    from mmdc.eval.iteration import iterations, load_results

    last: int | None = None
    scores: dict[str, dict[str, float]] = {}
    for benchmark, runs in load_results(path).items():
        points = iterations(runs)
        if not points:
            continue
        k, payload = points[-1]
        last = k if last is None else max(last, k)
        scores[benchmark] = _numeric(payload)
    return last, scores


def _numeric(payload: dict) -> dict[str, float]:
    metrics = payload["metrics"]
    return {
        c: float(metrics[c])
        for c in payload.get("columns", [])
        if isinstance(metrics.get(c), (int, float)) and not isinstance(metrics.get(c), bool)
    }


def _curves(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """{benchmark: {iteration: {column: score}}} of one run: Figure 4 (the headline column) and, per
    column (the world's question families, say), where the student gained or did not."""
    from mmdc.eval.iteration import iterations, load_results

    return {
        benchmark: {k: cols for k, p in iterations(runs) if (cols := _numeric(p))}
        for benchmark, runs in load_results(path).items()
    }


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
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        return {}
    records = []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: the others still count
            continue
    out: dict[str, float] = {}
    for label, phase, key, how, _ in PROCESS:
        values = [
            float(r[key])
            for r in records
            if r.get("phase")
            and (phase is None or r["phase"] == phase)
            and isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool)
        ]
        if values:
            out[label] = sum(values) if how == "sum" else statistics.fmean(values)
    return out


def _stats(values: Sequence[float]) -> dict[str, Any]:
    """mean, sample standard deviation (None for one value), min, max, n."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def build_summary(out: Path, variants: Sequence[Variant], seeds: Sequence[int]) -> dict:
    """Collect every run's final scores and aggregate them per variant (pure: reads the run directories only)."""
    from mmdc.eval.harness import headline
    from mmdc.eval.iteration import TEACHER, load_results

    summary: dict[str, Any] = {"seeds": list(seeds), "variants": {}, "teacher": {}, "benchmarks": {}}
    for variant in variants:
        per_seed: dict[str, Any] = {}
        values: dict[str, dict[str, list[float]]] = {}
        curves: dict[str, dict[int, dict[str, list[float]]]] = {}
        process: dict[str, list[float]] = {}
        missing = []
        for seed in seeds:
            path = run_dir(out, variant, seed)
            last, scores = final_scores(path) if path.exists() else (None, {})
            if not scores:
                missing.append(seed)
                continue
            per_seed[str(seed)] = {"iteration": last, "scores": scores, "finished": _status(path) == "finished"}
            for benchmark, cols in scores.items():
                order = summary["benchmarks"].setdefault(benchmark, [])
                order += [c for c in cols if c not in order]
                for column, value in cols.items():
                    values.setdefault(benchmark, {}).setdefault(column, []).append(value)
            for label, value in process_stats(path).items():
                process.setdefault(label, []).append(value)
            for benchmark, curve in _curves(path).items():
                for k, cols in curve.items():
                    for column, value in cols.items():
                        curves.setdefault(benchmark, {}).setdefault(k, {}).setdefault(column, []).append(value)
            for benchmark, runs in load_results(path).items():
                if TEACHER in runs and benchmark not in summary["teacher"]:
                    summary["teacher"][benchmark] = _numeric(runs[TEACHER])
        per_column = {
            b: {str(k): {col: _stats(v) for col, v in cols.items()} for k, cols in sorted(c.items())}
            for b, c in curves.items()
        }
        summary["variants"][variant.name] = {
            "overrides": list(variant.overrides),
            "runs": per_seed,
            "missing_seeds": missing,
            "final": {b: {c: _stats(v) for c, v in cols.items()} for b, cols in values.items()},
            "per_iteration": {
                b: {k: cols[headline(b)] for k, cols in c.items() if headline(b) in cols} for b, c in per_column.items()
            },  # Figure 4: the headline column alone
            "per_iteration_columns": per_column,
            "process": {label: _stats(v) for label, v in process.items()},
        }
    return summary


def _cell(stats: dict | None, decimals: int) -> str:
    if not stats:
        return "–"
    if stats["std"] is None or math.isnan(stats["std"]):
        return f"{stats['mean']:.{decimals}f}"
    return f"{stats['mean']:.{decimals}f} ± {stats['std']:.{decimals}f}"


def _number(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def render_summary(summary: dict) -> str:
    """The Markdown summary: headline table (Tables 4/5), full columns per benchmark, headline per iteration
    (Figure 4), every column per iteration, then what the loop did."""
    from mmdc.eval.harness import TABLE_DECIMALS, headline

    benchmarks = list(summary["benchmarks"])
    variants = summary["variants"]
    seeds = ", ".join(str(s) for s in summary["seeds"])
    lines = [
        "# Ablation summary",
        "",
        f"Mean ± sample standard deviation over seeds ({seeds}) of the student's score after the last "
        "iteration; `n` is the number of seeds with results. The teacher row is the reference.",
        "",
    ]
    if not benchmarks:
        return "\n".join(lines + ["No run has evaluation results yet.", ""])

    head = ["variant", "overrides", "n", *[f"{b} {headline(b)}" for b in benchmarks]]
    lines += ["## Final score per benchmark (paper Tables 4 and 5)", "", _row(head), _rule(len(head))]
    for name, v in variants.items():
        n = len(v["runs"])
        cells = [_cell(v["final"].get(b, {}).get(headline(b)), TABLE_DECIMALS.get(b, 2)) for b in benchmarks]
        lines.append(_row([name, "`" + ", ".join(v["overrides"]) + "`" if v["overrides"] else "–", str(n), *cells]))
    teacher = summary["teacher"]
    if teacher:
        cells = [_number(teacher.get(b, {}).get(headline(b)), TABLE_DECIMALS.get(b, 2)) for b in benchmarks]
        lines.append(_row(["teacher (reference)", "–", "–", *cells]))
    lines.append("")

    for b in benchmarks:
        columns = summary["benchmarks"][b]
        decimals = TABLE_DECIMALS.get(b, 2)
        lines += [f"## {b}: every column", "", _row(["variant", *columns]), _rule(len(columns) + 1)]
        for name, v in variants.items():
            lines.append(_row([name, *[_cell(v["final"].get(b, {}).get(c), decimals) for c in columns]]))
        if b in teacher:
            lines.append(_row(["teacher (reference)", *[_number(teacher[b].get(c), decimals) for c in columns]]))
        lines.append("")

        ks = sorted({int(k) for v in variants.values() for k in v["per_iteration"].get(b, {})})
        if ks:
            lines += [
                f"### {b} {headline(b)} per iteration (Figure 4)",
                "",
                _row(["variant", *[f"iteration {k}" for k in ks]]),
                _rule(len(ks) + 1),
            ]
            for name, v in variants.items():
                curve = v["per_iteration"].get(b, {})
                lines.append(_row([name, *[_cell(curve.get(str(k)), decimals) for k in ks]]))
            lines.append("")
            lines += [
                f"### {b}: every column per iteration",
                "",
                _row(["variant", "iteration", *columns]),
                _rule(len(columns) + 2),
            ]
            for name, v in variants.items():
                for k, cols in v.get("per_iteration_columns", {}).get(b, {}).items():
                    lines.append(_row([name, k, *[_cell(cols.get(c), decimals) for c in columns]]))
            lines.append("")

    places = {label: d for label, *_, d in PROCESS}
    labels = [label for label in places if any(label in v.get("process", {}) for v in variants.values())]
    if labels:
        lines += [
            "## What the loop did (per run, then mean ± std over seeds)",
            "",
            "Tuning rows: teacher-answered rows per tuning phase; teacher answers: generations over the "
            "whole run (cache misses); ratios and questions: mean over iterations.",
            "",
            _row(["variant", *labels]),
            _rule(len(labels) + 1),
        ]
        for name, v in variants.items():
            lines.append(_row([name, *[_cell(v.get("process", {}).get(label), places[label]) for label in labels]]))
        lines.append("")

    gaps = [
        f"{name}: seeds {', '.join(map(str, v['missing_seeds']))}" for name, v in variants.items() if v["missing_seeds"]
    ]
    unfinished = [f"{name} seed {s}" for name, v in variants.items() for s, r in v["runs"].items() if not r["finished"]]
    if gaps:
        lines += ["Runs without results (failed or not run yet): " + "; ".join(gaps) + ".", ""]
    if unfinished:
        lines += ["Runs not finished (their last evaluated iteration is used): " + ", ".join(unfinished) + ".", ""]
    return "\n".join(lines)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _rule(n: int) -> str:
    return "|" + "---|" * n


def write_summary(out: Path, variants: Sequence[Variant], seeds: Sequence[int]) -> dict:
    """Build, then write ``summary.md`` and ``summary.json`` into ``out``."""
    summary = build_summary(out, variants, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / SUMMARY_MD).write_text(render_summary(summary), encoding="utf-8")
    return summary


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmdc.ablate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--config", default=None, help="base YAML config (default: mmdc.run's, configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="folder for the runs and the summary")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated run seeds (default: 0,1,2)")
    p.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a preset ({', '.join(PRESETS)}) or group ({', '.join(GROUPS)}); repeatable",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="a variant of your own; repeatable (with no --preset/--variant: every preset)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every run, e.g. --set run.iterations=3 (repeatable)",
    )
    p.add_argument("--address", default=None, help="Ray cluster to join (as for python -m mmdc.run)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a new local Ray cluster")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--summarize-only", action="store_true", help="only rebuild the summary from the runs in --out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from mmdc.config import ConfigError
    from mmdc.run import DEFAULT_CONFIG

    try:
        variants = resolve_variants(args.preset, args.variant)
        seeds = parse_seeds(args.seeds)
    except ValueError as err:
        print(f"mmdc.ablate: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    failed: list[str] = []
    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)
    if not args.summarize_only:
        try:
            validate(config, variants, seeds, args.overrides)
        except ConfigError as err:
            print(f"mmdc.ablate: config error: {err}", file=sys.stderr)
            return 2
        ray_args = (["--address", args.address] if args.address else []) + (
            ["--num-cpus", str(args.num_cpus)] if args.num_cpus is not None else []
        )
        steps = plan(out, config, variants, seeds, args.overrides, ray_args)
        if args.dry_run:
            for path, status, argv in steps:
                print(f"{path.name} [{status}]: python -m mmdc.run {' '.join(argv)}")
            return 0
        from mmdc.run import main as run_main

        outcomes = run_all(steps, run_main)
        failed = [o["run"] for o in outcomes if o["rc"] != 0]
        if failed:
            print(f"mmdc.ablate: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    write_summary(out, variants, seeds)
    print(f"mmdc.ablate: summary in {out / SUMMARY_MD}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
