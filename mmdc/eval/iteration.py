"""Evaluation during a run: the configured benchmarks after each iteration, into ``eval/<benchmark>/``.

The Driver calls ``evaluate_iteration`` for the student after stage 1
(iteration 0) and after every iteration's training, and once for the teacher,
the reference line of the report (the paper's Figure 4). Results land in the
run directory, one file per (benchmark, model), in ``results.json`` format:

    eval/<benchmark>/iter_<k>.json            the student after iteration k (0 = after stage 1)
    eval/<benchmark>/iter_<k>.samples.jsonl   prompt, raw output, parsed answer, correct, seed per sample
    eval/<benchmark>/teacher.json (+ .samples.jsonl)
    eval/world_mc/questions.json              the world's test split as multiple choice (ScienceQA format)

A result that exists for the same model is kept, so a resumed run does not ask
again; sampling uses per-sample seeds from ``eval.sampling_seed`` (fixed across
runs), so every iteration and every run is asked exactly the same way.
``mmdc.report`` reads these files back (``load_results``) for the table and plot.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from mmdc.config import Config, eval_benchmarks
from mmdc.eval import harness, report
from mmdc.eval.harness import Generator
from mmdc.eval.serve import endpoint_judge

log = logging.getLogger("mmdc.eval")

EVAL_DIR = "eval"
TEACHER = "teacher"
Label = Literal["student", "teacher"]


def result_stem(iteration: int, label: Label) -> str:
    """File stem of one result: ``teacher`` for the reference, else ``iter_<k>``."""
    return TEACHER if label == TEACHER else f"iter_{iteration}"


def result_path(run_dir: str | Path, benchmark: str, iteration: int, label: Label) -> Path:
    return Path(run_dir) / EVAL_DIR / benchmark / f"{result_stem(iteration, label)}.json"


def build_task(cfg: Config, benchmark: str, run_dir: Path, world_dir: Path | None) -> harness.Task:
    """The ``harness.Task`` for one configured benchmark (files from ``cfg.eval.<benchmark>``, or the world)."""
    limit = cfg.eval.limit
    if benchmark in ("world", "world_mc"):
        if world_dir is None:
            raise ValueError(f"benchmark {benchmark!r} needs the run's world folder (data.source = world)")
        if benchmark == "world":
            return harness.world_task(world_dir, limit)
        questions = run_dir / EVAL_DIR / benchmark / "questions.json"
        return harness.world_mc_task(world_dir, questions, cfg.data.world.seed, limit)
    files = getattr(cfg.eval, benchmark)
    if benchmark == "scienceqa":
        return harness.scienceqa_task(files.data, files.images, files.problems, files.pid_splits, files.split, limit)
    if benchmark == "seed":
        return harness.seed_task(files.data, files.images, limit)
    if benchmark == "llavabench":
        return harness.llavabench_task(files.data, files.answers, files.context, files.images, limit)
    raise ValueError(f"unknown benchmark {benchmark!r}")


def needs_judge(cfg: Config) -> bool:
    """True when LLaVA-Bench is configured without its own judge URL: the caller must pass the teacher as judge."""
    return "llavabench" in eval_benchmarks(cfg) and not cfg.eval.llavabench.judge_url


def _judge(cfg: Config, judge: Generator | None) -> Generator | None:
    bench = cfg.eval.llavabench
    if judge is None and bench.judge_url:
        return endpoint_judge(bench.judge_url, bench.judge_model, bench.judge_api_key_env)
    return judge


def evaluate_iteration(
    cfg: Config,
    run_dir: str | Path,
    iteration: int,
    label: Label,
    generator: Generator,
    world_dir: str | Path | None = None,
    judge: Generator | None = None,
    model: str | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Run every benchmark of ``cfg.eval`` on ``generator``; write and return {benchmark: results payload}.

    ``label`` says who answers: "student" (asked with bare questions, written as
    ``iter_<iteration>``) or "teacher" (asked with the Table 6 teacher prompt, as
    in the run, written as ``teacher``). ``model`` (the checkpoint path) goes into
    the results; an existing result for the same model is returned as it is
    unless ``overwrite``. ``judge`` answers LLaVA-Bench's judge prompts (the run's
    teacher engine) unless ``eval.llavabench.judge_url`` names an endpoint.
    """
    root = Path(run_dir)
    world = Path(world_dir) if world_dir is not None else None
    judge = _judge(cfg, judge)
    stem = result_stem(iteration, label)
    out: dict[str, dict] = {}
    for benchmark in eval_benchmarks(cfg):
        path = result_path(root, benchmark, iteration, label)
        if path.exists() and not overwrite:
            existing = report.read_results(path)
            if model is None or existing.get("meta", {}).get("model") in (None, model):
                log.info("%s: %s exists, kept", benchmark, path)
                out[benchmark] = existing
                continue
        started = time.monotonic()
        task = build_task(cfg, benchmark, root, world)
        metrics, samples, meta = harness.run_task(
            task,
            generator,
            base_seed=cfg.eval.sampling_seed,
            batch_size=cfg.eval.batch_size,
            temperature=cfg.eval.temperature,
            max_new_tokens=cfg.eval.max_new_tokens,
            judge=judge,
            role=label,
        )
        meta.update(
            label=label,
            iteration=None if label == TEACHER else iteration,
            model=model,
            model_name=TEACHER if label == TEACHER else stem,
            limit=cfg.eval.limit,
            elapsed_s=round(time.monotonic() - started, 2),
        )
        report.write_named_results(path.parent, stem, benchmark, metrics, samples, meta)
        out[benchmark] = report.read_results(path)
    return out


def headline_metrics(results: dict[str, dict]) -> dict[str, Any]:
    """One number per benchmark for a metrics.jsonl line: ``{"eval_world_Avg": 62.5, ...}``."""
    flat: dict[str, Any] = {}
    for benchmark, payload in results.items():
        column = harness.headline(benchmark)
        flat[f"eval_{benchmark}_{column}"] = payload["metrics"].get(column)
    return flat


def load_results(run_dir: str | Path) -> dict[str, dict[str, dict]]:
    """Every result of a run: {benchmark: {"teacher" | "iter_<k>": payload}}, benchmarks and files sorted.

    A file that is not a results file (e.g. a half-written one from another tool) is skipped with a warning.
    """
    base = Path(run_dir) / EVAL_DIR
    found: dict[str, dict[str, dict]] = {}
    if not base.is_dir():
        return found
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        runs: dict[str, dict] = {}
        files = [p for p in folder.glob("*.json") if p.stem == TEACHER or _iteration_of(p.stem) is not None]
        for path in sorted(files, key=lambda p: (p.stem != TEACHER, _iteration_of(p.stem) or 0)):
            try:
                runs[path.stem] = report.read_results(path)
            except ValueError as err:
                log.warning("skipping %s: %s", path, err)
        if runs:
            found[folder.name] = runs
    return found


def _iteration_of(stem: str) -> int | None:
    """k for ``iter_<k>``, None for anything else."""
    if stem.startswith("iter_") and stem[5:].isdigit():
        return int(stem[5:])
    return None


def iterations(results: dict[str, dict]) -> list[tuple[int, dict]]:
    """The student results of one benchmark as (iteration, payload), by iteration."""
    pairs = [(_iteration_of(stem), payload) for stem, payload in results.items()]
    return sorted(((k, p) for k, p in pairs if k is not None), key=lambda kp: kp[0])


__all__ = [
    "EVAL_DIR",
    "TEACHER",
    "build_task",
    "evaluate_iteration",
    "headline_metrics",
    "iterations",
    "load_results",
    "needs_judge",
    "result_path",
    "result_stem",
]
