"""Ray Train for the student: stage 1 (align, projector only) and stage 2 (tune, projector + LM).

``train_student`` runs a ``TorchTrainer`` whose workers (``mmdc.train.worker``) stream their rows from
the caller's Ray Dataset, format them (Eq. 2 conversations for ``tune``, ``<image>\\n caption</s>`` for
``align``), train with DeepSpeed ZeRO or torch DDP and save a Hugging Face checkpoint that every serving
backend and the next iteration load with ``from_pretrained``. ``output_dir`` must be on storage the
caller and the rank-0 worker share. Global batch = micro batch x accumulation x workers.

Resume is exact on the same cluster shape: the shard order is deterministic (``preserve_order`` ingest,
no shuffle, Eq. 2's image position a hash of seed, id and epoch), so a resumed run sees the same micro
batches as an uninterrupted one (``mmdc.train.checkpoints``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig

from mmdc.config import TrainConfig, grad_accumulation
from mmdc.data.blocks import dataset_from_table
from mmdc.data.images import resolve_image
from mmdc.train.checkpoints import SUMMARY_FILE, prepare_state, resume_fingerprint, train_state_dir
from mmdc.train.worker import Stage, TrainJob, train_worker

log = logging.getLogger("mmdc.train")


@dataclass
class TrainResult:
    """Where the trained student was saved and what the run measured."""

    checkpoint_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)


def planned_steps(num_rows: int, train_cfg: TrainConfig) -> int:
    """Optimizer steps the schedule is planned for: each worker gets rows // workers rows (equal split)."""
    per_worker = num_rows // train_cfg.num_workers
    micro_per_epoch = math.ceil(per_worker / train_cfg.micro_batch_size)
    return (micro_per_epoch * train_cfg.epochs) // grad_accumulation(train_cfg)


def conversations_dataset(path: Path, image_root: str | None, num_blocks: int) -> ray.data.Dataset:
    """A conversations Parquet file as a Dataset whose rows carry absolute image paths (workers run anywhere).

    Not ``read_parquet``: its listing task would wait for a CPU the trainer's workers (or a crashed
    attempt's, not yet reclaimed) hold; see ``dataset_from_table``.
    """
    frame = pd.read_parquet(path)
    frame["image"] = [resolve_image(image, image_root) if image else image for image in frame["image"]]
    return dataset_from_table(pa.Table.from_pandas(frame, preserve_index=False), num_blocks)


def train_student(
    *,
    stage: Stage,
    init_checkpoint: str,
    output_dir: str,
    dataset: ray.data.Dataset,
    train_cfg: TrainConfig,
    seed: int,
    image_root: str | None = None,
    metrics_path: str | None = None,
    run_name: str = "student",
    max_failures: int = 1,
    resume: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train the student on ``dataset`` with Ray Train and save it in HF format into ``output_dir``.

    ``stage`` "align" trains only the projector on caption pairs; "tune" trains projector + LM on
    conversations (LoRA on the LM when ``train_cfg.lora.enabled``). Raises ValueError before any worker
    starts when the data cannot make one optimizer step, or ``output_dir`` already holds files (a finished
    checkpoint is never overwritten). ``max_failures``: times Ray Train restarts a failed worker group (one
    retry absorbs Ray Train V2's placement-group cleaner mistaking a busy controller for a dead one on an
    overloaded machine; it resumes from the latest saved state). ``resume``: continue from
    ``<output_dir>.train_state/`` when an interrupted call left one (refused, naming the differing keys,
    when it was saved by a different setup); False deletes it. ``on_step(step)`` is called by every
    worker after each optimizer step (callbacks, fault injection in tests).
    """
    if stage not in ("align", "tune"):
        raise ValueError(f"stage must be 'align' or 'tune', got {stage!r}")
    out = Path(output_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output_dir {out} is not empty; refusing to overwrite a checkpoint")
    accum = grad_accumulation(train_cfg)
    if accum < 1 or train_cfg.global_batch_size % (train_cfg.micro_batch_size * train_cfg.num_workers):
        raise ValueError(
            f"global_batch_size {train_cfg.global_batch_size} must be a positive multiple of "
            f"micro_batch_size x num_workers = {train_cfg.micro_batch_size * train_cfg.num_workers}"
        )
    if train_cfg.checkpoint_every_steps < 0:
        raise ValueError(f"checkpoint_every_steps must be >= 0, got {train_cfg.checkpoint_every_steps}")
    num_rows = dataset.count()
    total_steps = planned_steps(num_rows, train_cfg)
    if total_steps < 1:
        raise ValueError(
            f"{stage}: {num_rows} rows over {train_cfg.num_workers} workers x {train_cfg.epochs} epoch(s) do not "
            f"fill one global batch of {train_cfg.global_batch_size}; lower global_batch_size or add data"
        )
    use_gpu = train_cfg.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": train_cfg.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = train_cfg.gpus_per_worker
    job = TrainJob(
        stage=stage,
        init_checkpoint=init_checkpoint,
        output_dir=str(out),
        train=train_cfg,
        seed=seed,
        total_steps=total_steps,
        grad_accum=accum,
        state_dir=str(train_state_dir(out)),
        fingerprint=resume_fingerprint(stage, init_checkpoint, seed, num_rows, total_steps, train_cfg),
        run_name=run_name,
        image_root=image_root,
        metrics_path=str(Path(metrics_path).resolve()) if metrics_path else None,
        on_step=on_step,
    )
    resume_from = prepare_state(Path(job.state_dir), job.fingerprint, resume)
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(out.parent / ".ray_train"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": dataset},
        dataset_config=_ordered_ingest(),
    )
    log.info(
        "%s: %d rows, %d planned optimizer steps (accum %d), strategy %s%s",
        run_name,
        num_rows,
        total_steps,
        accum,
        train_cfg.strategy,
        f", resuming after step {resume_from}" if resume_from else "",
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if not (out / SUMMARY_FILE).exists():
        raise RuntimeError(f"{run_name}: training finished but no checkpoint was written to {out}")
    shutil.rmtree(job.state_dir, ignore_errors=True)  # the final checkpoint supersedes it
    return TrainResult(checkpoint_dir=str(out), metrics=json.loads((out / SUMMARY_FILE).read_text()))


def train_or_reuse(
    output: Path,
    dataset: Callable[[], ray.data.Dataset],
    *,
    restart: bool,
    announce: Callable[[str], None],
    before_start: Callable[[], None] = lambda: None,
    **train_kwargs: Any,
) -> dict[str, Any]:
    """``train_student`` into ``output`` after a crash as well as before one: the summary of the training.

    A checkpoint an earlier attempt finished (it crashed before committing its phase) is reused; an interrupted
    one resumes from its last saved state; ``restart`` (a forced change to what training depends on) discards
    both. ``dataset`` is a thunk, so nothing is read when the checkpoint is reused; ``before_start`` runs just
    before the trainer starts (the driver waits there for the trainer's resources).
    """
    stage = train_kwargs["stage"]
    if restart and output.exists():
        announce(f"{stage}: discarding {output.name}, made before a forced change of what training depends on")
        shutil.rmtree(output)
    if (output / SUMMARY_FILE).exists():
        announce(f"{stage}: reusing {output.name}, finished by an earlier attempt")
        return json.loads((output / SUMMARY_FILE).read_text())
    shutil.rmtree(output, ignore_errors=True)  # an empty folder left behind would be refused
    rows = dataset()
    before_start()
    return train_student(output_dir=str(output), dataset=rows, resume=not restart, **train_kwargs).metrics


def _ordered_ingest() -> Any:
    """Ray Train data config whose shards see the same rows in the same order on every run (for resume).

    ``preserve_order`` makes Ray Data's streaming split hand blocks out round-robin by row count instead of
    by locality and completion order; the cost is some cross-node reads, which training data affords.
    """
    from ray.data import DataContext
    from ray.train import DataConfig

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options)
