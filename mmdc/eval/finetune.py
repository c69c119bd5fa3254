"""Paper Table 1's protocol: fine-tune a student on ScienceQA's train split with Ray Train, then score its test split.

"For the ScienceQA dataset, we trained on the training set for 6 epochs and set the learning rate to 2e-5, keeping
the remaining hyperparameters unchanged" (paper 4.1.3). So the fine-tune is stage 2's training
(``train_student(stage="tune")``: the same strategies, conversation formatting and checkpoint format) with the
config's ``tune`` section, but ``eval.scienceqa.finetune``'s epochs and learning rate (6 and 2e-5 by default);
the fine-tuned checkpoint is then scored by the ScienceQA harness, as the zero-shot results are.

Two callers: ``python -m mmdc.finetune`` (any checkpoint, by hand) and the Driver (``eval.scienceqa.finetune``,
after the last iteration). Both write ``finetuned.json`` and ``finetuned.samples.jsonl`` (``results.json``
format) beside the zero-shot results; a run keeps them in ``eval/scienceqa/``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdc.config import Config, EngineConfig, EvalConfig, FinetuneConfig, TrainConfig
from mmdc.eval import harness, report, scienceqa
from mmdc.eval.harness import Generator
from mmdc.eval.iteration import EVAL_DIR
from mmdc.rundir import RunDir

BENCHMARK = "scienceqa"
FINETUNED = "finetuned"  # the result's stem: eval/scienceqa/finetuned.json in a run
CHECKPOINT_DIR = Path("checkpoints") / "scienceqa"  # the fine-tuned student, relative to a run directory
# eval.scienceqa.finetune keys the fine-tuned checkpoint depends on (max_new_tokens only changes the scoring)
TRAINING_KEYS = frozenset(f"eval.scienceqa.finetune.{key}" for key in ("data", "images", "epochs", "lr"))


@dataclass
class FinetuneResult:
    """Where the fine-tuned student is, what it was trained on and what the training measured."""

    checkpoint: str
    data: dict[str, int]  # TrainSet.stats: rows, with_image, text_only, skipped
    summary: dict[str, Any]  # the training summary (train_summary.json)
    skipped: list[dict] = field(default_factory=list)  # train records left out, with their reasons


def stale_finetune_keys(changed: list[str]) -> list[str]:
    """The dotted config keys among ``changed`` that make a fine-tuned checkpoint (or its saved state) stale."""
    from mmdc.train.checkpoints import stale_training_keys

    return stale_training_keys(changed) + [key for key in changed if key in TRAINING_KEYS]


def finetune_train_config(tune: TrainConfig, finetune: FinetuneConfig) -> TrainConfig:
    """Stage 2's training settings with the fine-tune's epochs and learning rate (paper: 6 and 2e-5)."""
    return dataclasses.replace(tune, enabled=True, epochs=finetune.epochs, lr=finetune.lr)


def finetune_scienceqa(
    init_checkpoint: str,
    cfg: Config,
    output: str | Path,
    *,
    restart: bool = False,
    announce: Callable[[str], None] = print,
    before_start: Callable[[], None] = lambda: None,
    metrics_path: str | None = None,
    run_name: str = "finetune-scienceqa",
) -> FinetuneResult:
    """Fine-tune ``init_checkpoint`` on ``eval.scienceqa.finetune.data`` into ``output`` with Ray Train and ``cfg``'s
    ``tune`` section (a finished checkpoint there is reused, an interrupted one resumed; ``restart`` discards both).

    The train file is read and every image opened first (``scienceqa.load_train``): bad records come back in
    ``skipped``, text-only questions are trained without an image.
    """
    from mmdc.train.launcher import train_or_reuse

    finetune = cfg.eval.scienceqa.finetune
    train_set = scienceqa.load_train(finetune.data, finetune.images, cfg.data.max_image_pixels)
    train_cfg = finetune_train_config(cfg.tune, finetune)
    summary = train_or_reuse(
        Path(output),
        lambda: _dataset(train_set.rows, str(Path(finetune.images).resolve()), max(1, train_cfg.num_workers) * 2),
        restart=restart,
        announce=announce,
        before_start=before_start,
        stage="tune",
        init_checkpoint=init_checkpoint,
        train_cfg=train_cfg,
        seed=cfg.run.seed,
        metrics_path=metrics_path,
        run_name=run_name,
    )
    return FinetuneResult(str(Path(output).resolve()), train_set.stats, summary, train_set.skipped)


def finetune_run(
    run_dir: RunDir,
    student: str,
    cfg: Config,
    generator_for: Callable[[str], Generator],
    *,
    forced: list[str],
    announce: Callable[[str], None],
    before_start: Callable[[], None],
) -> dict[str, Any]:
    """A run's Table 1 phase: ``student`` fine-tuned into checkpoints/scienceqa/ (started over when a ``forced``
    config key makes the old one stale), its skipped train records logged, the fine-tuned checkpoint scored
    through ``generator_for(checkpoint)`` into eval/scienceqa/finetuned.json; the phase's record."""
    tuned = finetune_scienceqa(
        student,
        cfg,
        run_dir.root / CHECKPOINT_DIR,
        restart=bool(stale_finetune_keys(forced)),
        announce=announce,
        before_start=before_start,
        metrics_path=str(run_dir.metrics),
        run_name=f"{run_dir.root.name}-finetune",
    )
    run_dir.log_skips([{"stage": "finetune", **skip} for skip in tuned.skipped])
    generator = generator_for(tuned.checkpoint)
    results = evaluate_finetuned(cfg.eval, generator, finetuned_path(run_dir.root).parent, model=tuned.checkpoint)
    train = {f"train_{key}": value for key, value in tuned.summary.items()}
    return {**tuned.data, **train, "scienceqa_finetuned_Avg": results["metrics"].get("Avg")}


def _dataset(rows: list[dict], images: str, blocks: int) -> Any:
    """The train rows as a Ray Dataset with absolute image paths (the workers run anywhere); None stays None."""
    import pyarrow as pa

    from mmdc.data.blocks import dataset_from_table
    from mmdc.data.images import resolve_image

    located = [{**row, "image": resolve_image(row["image"], images) if row["image"] else None} for row in rows]
    return dataset_from_table(pa.Table.from_pylist(located), blocks)


def evaluate_finetuned(eval_cfg: EvalConfig, generator: Generator, out_dir: str | Path, *, model: str) -> dict:
    """Score ``generator`` (the fine-tuned student) on ``eval_cfg.scienceqa``'s test file; write and return the results.

    Asked as the run asks the zero-shot student (bare question, the paper's T = 0.5 unless ``eval.temperature``,
    per-sample seeds from ``eval.sampling_seed``), with room for the answer a QCM-LEA model writes
    (``eval.scienceqa.finetune.max_new_tokens``). Writes ``<out_dir>/finetuned.json`` and its samples.
    """
    files = eval_cfg.scienceqa
    started = time.monotonic()
    task = harness.scienceqa_task(
        files.data, files.images, files.problems, files.pid_splits, files.split, eval_cfg.limit
    )
    metrics, samples, meta = harness.run_task(
        task,
        generator,
        base_seed=eval_cfg.sampling_seed,
        batch_size=eval_cfg.batch_size,
        temperature=eval_cfg.temperature,
        max_new_tokens=files.finetune.max_new_tokens,
        role="student",
    )
    meta.update(
        label=FINETUNED,
        model=model,
        model_name=FINETUNED,
        limit=eval_cfg.limit,
        finetune={"data": files.finetune.data, "epochs": files.finetune.epochs, "lr": files.finetune.lr},
        elapsed_s=round(time.monotonic() - started, 2),
    )
    paths = report.write_named_results(out_dir, FINETUNED, BENCHMARK, metrics, samples, meta)
    return report.read_results(paths["results"])


def evaluate_checkpoint(checkpoint: str, eval_cfg: EvalConfig, engine: EngineConfig, out_dir: str | Path) -> dict:
    """``evaluate_finetuned`` with ``checkpoint`` loaded in this process as the student engine would load it."""
    from mmdc.engines.hf import HFGenerator

    generator = HFGenerator(
        checkpoint, dtype=engine.dtype, max_batch_size=engine.max_batch_size, attention=engine.attention
    )
    return evaluate_finetuned(eval_cfg, generator, out_dir, model=checkpoint)


def finetuned_path(run_dir: str | Path) -> Path:
    """Where a run keeps its fine-tuned ScienceQA result (beside the zero-shot ``iter_<k>.json``)."""
    return Path(run_dir) / EVAL_DIR / BENCHMARK / f"{FINETUNED}.json"


__all__ = [
    "CHECKPOINT_DIR",
    "FINETUNED",
    "FinetuneResult",
    "evaluate_checkpoint",
    "evaluate_finetuned",
    "finetune_run",
    "finetune_scienceqa",
    "finetune_train_config",
    "finetuned_path",
    "stale_finetune_keys",
]
