"""The body of one Ray Train worker: load the student, wrap it in a strategy, train over its shard, save.

Every micro step the workers agree (one tiny all-reduce) that all of them still have a batch, so an
uneven shard ends the epoch everywhere instead of hanging a collective; a micro batch whose samples
were all dropped runs a zero-weighted placeholder so the collectives stay matched. Every tensor a
collective sees lives on the worker's device (NCCL has no CPU tensors).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray

from mmdc.config import TrainConfig
from mmdc.data.images import load_image, resolve_image
from mmdc.train import formatting as fmt
from mmdc.train.assembly import freeze_for_stage
from mmdc.train.checkpoints import Progress, TrainState
from mmdc.train.deepspeed_config import deepspeed_config
from mmdc.train.progress import append_jsonl, eta_seconds, progress_line
from mmdc.train.strategies import Strategy, make_strategy

log = logging.getLogger("mmdc.train")

Stage = Literal["align", "tune"]  # the paper's stage 1 (projector only) and stage 2 (projector + LM)
# ray.train.report (V2) blocks every worker until the controller has taken the previous report (it polls every
# ~2 s), so the latest step's metrics are reported at most this often, and on the last planned step; every step
# still goes to the log line and to the metrics file.
REPORT_INTERVAL_S = 10.0


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, decided once by the launcher (``train_student``)."""

    stage: Stage
    init_checkpoint: str
    output_dir: str
    train: TrainConfig
    seed: int
    total_steps: int  # optimizer steps the schedule is planned for
    grad_accum: int
    state_dir: str  # <output_dir>.train_state
    fingerprint: dict[str, Any]  # what a saved state must match to be resumed
    run_name: str = "student"
    image_root: str | None = None
    metrics_path: str | None = None
    on_step: Callable[[int], None] | None = None  # called by every worker after each optimizer step (and its save)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: ``config["job"]`` is the ``TrainJob``."""
    job: TrainJob = config["job"]
    started = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if job.train.gpus_per_worker <= 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    import torch
    from ray.train.torch import get_device

    torch.set_num_threads(1)
    torch.manual_seed(job.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if job.train.gpus_per_worker > 0 else torch.device("cpu")

    if device.type == "cuda":
        torch.cuda.set_device(device)  # zero.Init places this rank's partitions on the current device
    model, processor = load_student(job.init_checkpoint, job.stage, job.train, job.grad_accum)
    if not is_zero3(job.train):  # ZeRO-3 partitions are on the device already
        model.to(device)
    optimizer, scheduler = optimizer_and_schedule(model, job.train, job.total_steps)
    strategy = make_strategy(model, optimizer, scheduler, job.train, job.grad_accum, device)
    feeder = BatchFeeder(processor, job.stage, job.train.max_length, job.seed, job.image_root)
    state = TrainState(Path(job.state_dir), job.fingerprint)
    progress = state.restore(strategy, rank)
    log.info(
        "[%s] rank %d ready after %.1fs (model, %s strategy%s)",
        job.run_name,
        rank,
        time.perf_counter() - started,
        job.train.strategy,
        f", resumed after step {progress.step}" if progress.step else "",
    )
    metrics = TrainingLoop(strategy, feeder, job, rank, device, state, progress).run()
    strategy.save(job.output_dir, processor, lora=job.train.lora, rank=rank, summary={**metrics, "world_size": world})
    torch.distributed.barrier()  # the checkpoint is complete before any worker returns
    if device.type == "cuda" and job.metrics_path:  # what the plan's estimate is checked against (scripts/gpu_check.sh)
        peak = torch.cuda.max_memory_allocated(device)
        log.info(
            "[%s] rank %d: peak GPU memory allocated %.2f GiB (load, training, save)", job.run_name, rank, peak / 2**30
        )
        append_jsonl(
            job.metrics_path, {"event": "gpu_memory", "run": job.run_name, "rank": rank, "max_allocated": peak}
        )


def is_zero3(cfg: TrainConfig) -> bool:
    return cfg.strategy == "deepspeed" and cfg.zero_stage == 3


def load_dtype(cfg: TrainConfig) -> str:
    """The dtype a worker loads the student in: what its strategy keeps on the device, never more.

    - fp32 training, and DDP at any precision: float32. DDP's autocast computes in 16-bit from fp32
      parameters, and its GradScaler only unscales fp32 gradients: the fp32 weights are the training state.
    - DeepSpeed fp16 / bf16 (ZeRO 0-3): the 16-bit dtype. ``deepspeed.initialize`` would cast the module to it
      anyway, and its optimizer keeps the fp32 master copy of the trainable weights itself (partitioned from
      ZeRO-1 on, in host RAM with ``offload_optimizer``), made from these 16-bit values, as it would be from a
      cast fp32 load of the same (16-bit) checkpoint.
    ``mmdc.sizing.memory.load_bytes_per_param`` is the plan's copy of this rule (a test keeps them equal).
    """
    if cfg.strategy == "ddp" or cfg.precision == "fp32":
        return "float32"
    return {"fp16": "float16", "bf16": "bfloat16"}[cfg.precision]


@contextlib.contextmanager
def zero3_init(cfg: TrainConfig, grad_accum: int) -> Iterator[None]:
    """Under ZeRO-3, make ``from_pretrained`` build the model inside ``deepspeed.zero.Init``, partitioned as it
    is created, rank 0 reading the weights and handing each module's out in turn: no rank ever holds the whole
    model. transformers does this while an ``HfDeepSpeedConfig`` is alive; it is dropped on the way out so
    nothing else in this process sees ZeRO-3. A no-op for the other strategies."""
    if not is_zero3(cfg):
        yield
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    deepspeed.init_distributed(dist_backend="nccl" if cfg.gpus_per_worker > 0 else "gloo")
    marker = HfDeepSpeedConfig(deepspeed_config(cfg, grad_accum))
    try:
        yield
    finally:
        del marker
        unset_hf_deepspeed_config()


def load_student(path: str, stage: Stage, cfg: TrainConfig, grad_accum: int = 1) -> tuple[Any, Any]:
    """Load model + processor in ``load_dtype`` (ZeRO-3: partitioned by ``zero.Init``), freeze for the stage,
    add LoRA (tune only), enable checkpointing. The model stays on the CPU, except ZeRO-3 partitions, which
    ``zero.Init`` puts on the current device."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    with zero3_init(cfg, grad_accum):
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, load_dtype(cfg)))
        processor = AutoProcessor.from_pretrained(path)
        freeze_for_stage(model, stage)
        if cfg.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled and stage == "tune":
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            targets = "|".join(cfg.lora.target_modules)
            peft_cfg = PeftLoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                # Only the language model's projections: CLIP's attention has q/k/v_proj too.
                target_modules=rf".*language_model.*\.({targets})",
                modules_to_save=["multi_modal_projector"],  # the projector trains fully in stage 2
            )
            model = get_peft_model(model, peft_cfg)
        elif cfg.lora.enabled:
            log.info("align stage trains only the projector; LoRA settings are ignored")
    return model, processor


def optimizer_and_schedule(model: Any, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over trainable parameters; warmup_ratio of the steps, then cosine / linear / constant."""
    import torch
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters after freezing")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_schedule]
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


class BatchFeeder:
    """Turns a batch of dataset rows into a collated model batch (formatting + image preprocessing).

    A ``tune`` row whose ``image`` is None is a text-only sample (ScienceQA's fine-tuning has them); a micro
    batch of only such samples gets an image anchor (``image_anchor``) so the projector stays in the graph.
    """

    def __init__(self, processor: Any, stage: Stage, max_length: int, seed: int, image_root: str | None) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.stage = stage
        self.max_length = max_length
        self.seed = seed
        self.image_root = image_root
        self.image_seq_length = fmt.image_seq_length_of(processor)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _image_path(self, row: dict) -> str | None:
        """The row's image file; None for a text-only ``tune`` row (``image`` None)."""
        path = row.get("image")
        if path is None and self.stage == "tune":
            return None
        if not isinstance(path, str) or not path:
            raise ValueError(f"row {self._id(row)!r}: missing 'image' path")
        return resolve_image(path, self.image_root)

    def _id(self, row: dict) -> str:
        for key in ("conversation_id", "id", "image_id"):
            if row.get(key):
                return str(row[key])
        return "?"

    def _encode(self, row: dict, epoch: int) -> dict[str, Any]:
        if self.stage == "align":
            if "caption" not in row:
                raise ValueError(f"align row {self._id(row)!r}: missing 'caption' (columns: {sorted(row)})")
            return fmt.encode_caption(
                self.tokenizer,
                row["caption"],
                self.max_length,
                image_seq_length=self.image_seq_length,
                sample_id=self._id(row),
            )
        position = fmt.choose_image_position(self.seed, self._id(row), epoch) if row.get("image") else fmt.TEXT_ONLY
        return fmt.encode_conversation(
            self.tokenizer, row, position, self.max_length, image_seq_length=self.image_seq_length
        )

    def batch(self, rows: list[dict], epoch: int) -> tuple[dict[str, Any] | None, list[str]]:
        """Collated batch (None if every row was dropped) and the ids of dropped rows."""
        encoded = fmt.encode_rows(rows, lambda r: {**self._encode(r, epoch), "_row": r})
        if not encoded.samples:
            return None, encoded.dropped
        paths = [self._image_path(s.pop("_row")) for s in encoded.samples]  # None: a text-only sample
        with_image = [(sample, path) for sample, path in zip(encoded.samples, paths) if path is not None]
        if with_image:
            images = [load_image(path) for _, path in with_image]
            pixels = fmt.pixel_values(self.processor.image_processor, images)  # [samples with an image, 3, H, W]
            for (sample, _), pv in zip(with_image, pixels):
                sample["pixel_values"] = pv
            return fmt.collate(encoded.samples, self.pad_id), encoded.dropped
        return fmt.collate([*encoded.samples, self.image_anchor()], self.pad_id), encoded.dropped

    def _blank_image_sample(self) -> dict[str, Any]:
        """``<image>\\nnone</s>`` over a blank 8x8 image, encoded (the placeholder's and the anchor's sample)."""
        from PIL import Image

        sample = fmt.encode_caption(self.tokenizer, "none", 10**6, image_seq_length=self.image_seq_length)
        sample["pixel_values"] = fmt.pixel_values(self.processor.image_processor, [Image.new("RGB", (8, 8))])[0]
        return sample

    def placeholder(self) -> dict[str, Any]:
        """A one-sample batch used with loss weight 0 when a micro batch lost all its samples."""
        return fmt.collate([self._blank_image_sample()], self.pad_id)

    def image_anchor(self) -> dict[str, Any]:
        """A blank-image sample without any supervised token, added to a micro batch of text-only samples.

        The projector then still takes part in every forward pass: DDP and ZeRO expect a gradient (zero here) for
        every trainable parameter in every backward, which LLaVA ensures the same way (a zero-length slice of
        image features). The loss, a mean over supervised tokens, is unchanged; the step's sample and token
        counts leave the anchor out (``supervised_counts``).
        """
        sample = self._blank_image_sample()
        sample["labels"] = [fmt.IGNORE_INDEX] * len(sample["labels"])
        return sample


def supervised_counts(batch: dict[str, Any]) -> tuple[int, int]:
    """(samples, tokens) of a collated batch, leaving out samples without a supervised token (an image anchor)."""
    mask = batch["attention_mask"]  # [batch, seq]
    if "labels" in batch:
        mask = mask[(batch["labels"] != fmt.IGNORE_INDEX).any(dim=1)]
    return int(mask.shape[0]), int(mask.sum())


def _shard_batches(shard: Any, micro: int) -> Iterator[list[dict]]:
    for table in shard.iter_batches(batch_size=micro, batch_format="pyarrow"):
        yield table.to_pylist()


class TrainingLoop:
    """The loop proper over this worker's shard; ``run`` returns summary metrics (equal on every rank)."""

    def __init__(
        self,
        strategy: Strategy,
        feeder: Any,
        job: TrainJob,
        rank: int,
        device: Any,
        state: TrainState,
        progress: Progress,
    ) -> None:
        import torch

        self.strategy, self.feeder, self.job, self.cfg = strategy, feeder, job, job.train
        self.rank, self.device, self.state, self.p = rank, device, state, progress
        self.placeholder: dict[str, Any] | None = None
        # loss_sum, micro_count, samples, tokens since the last step; [4] = rank 0's 'report now' vote.
        self.window = torch.zeros(5, dtype=torch.float64, device=device)
        self.start = self.window_start = self.last_report = time.perf_counter()
        self.elapsed_before = progress.elapsed_s

    def run(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        shard = ray.train.get_dataset_shard("train")
        first_epoch = self.p.epoch
        for epoch in range(first_epoch, self.cfg.epochs):
            batches = _shard_batches(shard, self.cfg.micro_batch_size)
            if epoch != first_epoch:
                self.p.epoch, self.p.micro_in_epoch = epoch, 0
            for _ in range(self.p.micro_in_epoch):  # consumed before the restored step: skip, in shard order
                if next(batches, None) is None:
                    break
            while True:
                rows = next(batches, None)
                alive = torch.tensor([0 if rows is None else 1], dtype=torch.int64, device=self.device)
                dist.all_reduce(alive, op=dist.ReduceOp.MIN)  # every worker must still have a batch
                if alive.item() == 0:
                    break
                self.micro(rows, epoch)
        dropped = torch.tensor([self.p.dropped, self.p.empty], dtype=torch.int64, device=self.device)
        dist.all_reduce(dropped)
        p = self.p
        return {
            "stage": self.job.stage,
            "steps": p.step,
            "micro_steps_per_worker": p.micro_steps,
            "samples": p.samples,
            "tokens": p.tokens,
            "dropped_samples": int(dropped[0]),
            "empty_micro_batches": int(dropped[1]),
            "first_loss": p.first_loss,
            "final_loss": p.last_loss,
            "wall_time_s": self.elapsed(),
            "resumed_from_step": p.resumed_from,
        }

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def micro(self, rows: list[dict], epoch: int) -> None:
        """Forward + backward of one micro batch; on an accumulation boundary, the optimizer step."""
        import torch

        batch, dropped = self.feeder.batch(rows, epoch)
        self.p.dropped += len(dropped)
        weight = 1.0
        if batch is None:
            self.placeholder = self.placeholder or self.feeder.placeholder()
            batch, weight = self.placeholder, 0.0
        batch = {k: v.to(self.device) for k, v in batch.items()}
        loss = self.strategy.micro_step(batch, weight)
        lr = self.strategy.lr()  # the rate this step applies (the scheduler advances inside step())
        stepped = self.strategy.step()
        self.p.micro_steps += 1
        self.p.micro_in_epoch += 1
        self.p.empty += weight == 0.0
        if weight:
            n, tokens = supervised_counts(batch)
            self.window[:4] += torch.tensor(
                [float(loss.detach()), 1.0, n, tokens], dtype=torch.float64, device=self.device
            )
        if stepped:
            self.finish_step(lr, epoch)

    def finish_step(self, lr: float, epoch: int) -> None:
        """Count the step, log and record it, report it (throttled), save state when due, call ``on_step``."""
        import torch.distributed as dist

        p, job, total = self.p, self.job, self.job.total_steps
        p.step += 1
        now = time.perf_counter()
        if self.rank == 0 and (now - self.last_report >= REPORT_INTERVAL_S or p.step == total):
            self.window[4] = 1.0  # decided on rank 0 and summed to all: every rank reports at the same steps
        dist.all_reduce(self.window)
        window = self.window
        report_now = bool(window[4] > 0)
        span = max(now - self.window_start, 1e-9)
        step_loss = float(window[0] / window[1]) if window[1] else float("nan")
        p.first_loss = step_loss if p.first_loss is None else p.first_loss
        p.last_loss = step_loss
        p.samples += int(window[2])
        p.tokens += int(window[3])
        p.elapsed_s = self.elapsed()
        record = {
            "stage": job.stage,
            "run": job.run_name,
            "step": p.step,
            "epoch": epoch,
            "loss": step_loss,
            "lr": lr,
            "samples_per_s": float(window[2]) / span,
            "tokens_per_s": float(window[3]) / span,
        }
        window.zero_()
        self.window_start = now
        if self.rank == 0:
            eta = eta_seconds(p.step - p.resumed_from, now - self.start, total - p.step)
            log.info(
                progress_line(
                    job.run_name,
                    p.step,
                    total,
                    p.elapsed_s,
                    eta,
                    epoch,
                    step_loss,
                    lr,
                    record["samples_per_s"],
                    record["tokens_per_s"],
                )
            )
            if job.metrics_path:
                append_jsonl(job.metrics_path, record)
        if report_now:  # a Ray Train V2 report is a cross-worker barrier (~2 s on CPU): throttle it
            ray.train.report(record)
            self.last_report = now
        every = self.cfg.checkpoint_every_steps
        if every and p.step % every == 0 and p.step < total:  # the last step is followed by the final save
            self.state.save(self.strategy, p, self.rank)
        if job.on_step is not None:
            job.on_step(p.step)
