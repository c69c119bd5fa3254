"""Ray Train loops for the student: stage 1 (align, projector only) and stage 2 (tune, projector + LM).

``train_student`` is the one entry point. It runs a ``TorchTrainer`` whose workers read their rows
from ``ray.train.get_dataset_shard("train")`` (streamed from the caller's Ray Dataset, never a list
built on the driver), format them (``mmdc.train.formatting``: Eq. 2 conversations for ``tune``,
plain ``<image>\\n caption</s>`` for ``align``), train with DeepSpeed ZeRO or torch DDP, report
per-step metrics, and save a Hugging Face checkpoint (``save_pretrained``, safetensors, plus the
processor) that every serving backend and the next iteration load with ``from_pretrained``.

Rows: ``tune`` reads conversation rows (``mmdc.data.schema.CONVERSATION_SCHEMA``: conversation_id,
image, questions, answers); ``align`` reads caption pairs (``id``, ``image``, ``caption``).
``image`` is absolute or relative to ``image_root``. ``output_dir`` must be on storage that the
driver and the rank-0 worker share (a shared filesystem on a multi-node cluster).

Step accounting: global batch = micro batch x accumulation x workers (``mmdc.config.grad_accumulation``).
Every micro step, workers agree (one tiny all-reduce) that all of them still have a batch, so an
uneven shard ends the epoch everywhere instead of hanging a collective. A micro batch whose samples
were all dropped (nothing supervised after truncation) runs a zero-weighted placeholder so the
collectives stay matched; dropped samples are counted and reported. A trailing partial
accumulation at the very end is not stepped (the same in both strategies).

CPU note: with 2 cores, workers ask for ``cpus_per_worker = 0.5`` so Ray Data can still read; each
worker uses one torch thread, and DeepSpeed runs on its CPU accelerator over the gloo group that
Ray Train already created.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig

from mmdc.config import LoraConfig, TrainConfig, grad_accumulation

log = logging.getLogger(__name__)

Stage = Literal["align", "tune"]
SUMMARY_FILE = "train_summary.json"  # written beside the weights by rank 0
# ray.train.report (V2) blocks every worker until the controller has taken the previous report
# (it polls every ~2 s), so reporting every step would cost ~2 s per step on small models. We
# report the latest step's metrics at most this often, and on the last planned step; every step
# still goes to the log line and to metrics_path.
REPORT_INTERVAL_S = 10.0


@dataclass
class TrainResult:
    """Where the trained student was saved and what the run measured."""

    checkpoint_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------


def planned_steps(num_rows: int, train_cfg: TrainConfig) -> int:
    """Optimizer steps the schedule is planned for: each worker gets rows // workers rows (equal split)."""
    per_worker = num_rows // train_cfg.num_workers
    micro_per_epoch = math.ceil(per_worker / train_cfg.micro_batch_size)
    return (micro_per_epoch * train_cfg.epochs) // grad_accumulation(train_cfg)


def train_student(
    *,
    stage: Stage,
    init_checkpoint: str,
    output_dir: str,
    dataset: "ray.data.Dataset",
    train_cfg: TrainConfig,
    seed: int,
    image_root: str | None = None,
    metrics_path: str | None = None,
    run_name: str = "student",
    max_failures: int = 1,
) -> TrainResult:
    """Train the student on ``dataset`` with Ray Train and save it in HF format into ``output_dir``.

    ``stage`` "align" trains only the projector on caption pairs; "tune" trains projector + LM on
    conversations (LoRA on the LM when ``train_cfg.lora.enabled``). Raises ValueError before any
    worker starts when the data cannot make one optimizer step, or ``output_dir`` already holds
    files (a finished checkpoint is never overwritten). ``max_failures``: times Ray Train restarts a
    failed worker group (from the initial checkpoint; the metrics file then repeats those steps).
    On an overloaded machine Ray Train V2's placement-group cleaner can mistake a busy controller
    for a dead one and tear the workers down; one retry absorbs that.
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
    loop_config = {
        "stage": stage,
        "init_checkpoint": init_checkpoint,
        "output_dir": str(out),
        "train_cfg": asdict(train_cfg),
        "seed": seed,
        "image_root": image_root,
        "metrics_path": str(Path(metrics_path).resolve()) if metrics_path else None,
        "run_name": run_name,
        "total_steps": total_steps,
        "grad_accum": accum,
    }
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
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
    )
    log.info("%s: %d rows, %d planned optimizer steps (accum %d), strategy %s",
             run_name, num_rows, total_steps, accum, train_cfg.strategy)
    result = trainer.fit()
    if result.error:
        raise result.error
    if not (out / SUMMARY_FILE).exists():
        raise RuntimeError(f"{run_name}: training finished but no checkpoint was written to {out}")
    metrics = json.loads((out / SUMMARY_FILE).read_text())
    return TrainResult(checkpoint_dir=str(out), metrics=metrics)


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _train_worker(config: dict[str, Any]) -> None:
    """Body of one Ray Train worker: load, freeze, wrap, train over the shard, save on rank 0."""
    started = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = _train_config(config["train_cfg"])
    if cfg.gpus_per_worker <= 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported anywhere
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    from ray.train.torch import get_device

    device = get_device() if cfg.gpus_per_worker > 0 else torch.device("cpu")

    model, processor = _load_student(config["init_checkpoint"], config["stage"], cfg)
    model.to(device)
    optimizer, scheduler = _optimizer_and_schedule(model, cfg, config["total_steps"])
    engine = (_DeepSpeedEngine if cfg.strategy == "deepspeed" else _DDPEngine)(
        model, optimizer, scheduler, cfg, config["grad_accum"], device
    )
    feeder = _Feeder(processor, config["stage"], cfg.max_length, config["seed"], config["image_root"])
    log.info("[%s] rank %d ready after %.1fs (model, %s engine)", config["run_name"], rank,
             time.perf_counter() - started, cfg.strategy)
    metrics = _run_epochs(engine, feeder, cfg, config, rank, world, device)
    engine.save(config["output_dir"], processor, lora=cfg.lora, rank=rank, summary=metrics)
    torch.distributed.barrier()  # the checkpoint is complete before any worker returns


def _train_config(data: dict[str, Any]) -> TrainConfig:
    lora = LoraConfig(**data["lora"])
    return TrainConfig(**{**data, "lora": lora})


def _load_student(path: str, stage: Stage, cfg: TrainConfig) -> tuple[Any, Any]:
    """Load model + processor, freeze for the stage, add LoRA (tune only), enable checkpointing."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    _freeze(model, stage)
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


def _freeze(model: Any, stage: Stage) -> None:
    from mmdc.train.tiny import freeze_for_stage

    freeze_for_stage(model, stage)


def _optimizer_and_schedule(model: Any, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
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


class _Feeder:
    """Turns a batch of dataset rows into a collated model batch (formatting + image preprocessing)."""

    def __init__(self, processor: Any, stage: Stage, max_length: int, seed: int, image_root: str | None) -> None:
        from mmdc.train.formatting import image_seq_length_of

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.stage = stage
        self.max_length = max_length
        self.seed = seed
        self.image_root = image_root
        self.image_seq_length = image_seq_length_of(processor)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _image_path(self, row: dict) -> str:
        path = row.get("image")
        if not isinstance(path, str) or not path:
            raise ValueError(f"row {self._id(row)!r}: missing 'image' path")
        return path if os.path.isabs(path) or not self.image_root else os.path.join(self.image_root, path)

    def _id(self, row: dict) -> str:
        for key in ("conversation_id", "id", "image_id"):
            if row.get(key):
                return str(row[key])
        return "?"

    def _encode(self, row: dict, epoch: int) -> dict[str, Any]:
        from mmdc.train import formatting as fmt

        if self.stage == "align":
            if "caption" not in row:
                raise ValueError(f"align row {self._id(row)!r}: missing 'caption' (columns: {sorted(row)})")
            return fmt.encode_caption(self.tokenizer, row["caption"], self.max_length,
                                      image_seq_length=self.image_seq_length, sample_id=self._id(row))
        position = fmt.choose_image_position(self.seed, self._id(row), epoch)
        return fmt.encode_conversation(self.tokenizer, row, position, self.max_length,
                                       image_seq_length=self.image_seq_length)

    def batch(self, rows: list[dict], epoch: int) -> tuple[dict[str, Any] | None, list[str]]:
        """Collated batch (None if every row was dropped) and the ids of dropped rows."""
        from mmdc.data.images import load_image
        from mmdc.train import formatting as fmt

        encoded = fmt.encode_rows(rows, lambda r: {**self._encode(r, epoch), "_row": r})
        if not encoded.samples:
            return None, encoded.dropped
        images = [load_image(self._image_path(s.pop("_row"))) for s in encoded.samples]
        pixels = fmt.pixel_values(self.processor.image_processor, images)  # [batch, 3, H, W]
        for sample, pv in zip(encoded.samples, pixels):
            sample["pixel_values"] = pv
        return fmt.collate(encoded.samples, self.pad_id), encoded.dropped

    def placeholder(self) -> dict[str, Any]:
        """A one-sample batch used with loss weight 0 when a micro batch lost all its samples."""
        from mmdc.train import formatting as fmt

        sample = fmt.encode_caption(self.tokenizer, "none", 10**6, image_seq_length=self.image_seq_length)
        ip = self.processor.image_processor
        from PIL import Image

        sample["pixel_values"] = fmt.pixel_values(ip, [Image.new("RGB", (8, 8))])[0]
        return fmt.collate([sample], self.pad_id)


def _shard_batches(shard: Any, micro: int) -> Iterator[list[dict]]:
    for table in shard.iter_batches(batch_size=micro, batch_format="pyarrow"):
        yield table.to_pylist()


def _run_epochs(engine: Any, feeder: _Feeder, cfg: TrainConfig, config: dict[str, Any], rank: int, world: int,
                device: Any) -> dict[str, Any]:
    """The training loop proper; returns summary metrics (identical on every rank)."""
    import torch
    import torch.distributed as dist

    shard = ray.train.get_dataset_shard("train")
    placeholder = None
    step, micro_steps, empty = 0, 0, 0
    first_loss = last_loss = None
    totals = {"samples": 0, "dropped": 0, "tokens": 0}
    # loss_sum, micro_count, samples, tokens since the last step; [4] = rank 0's 'report now' vote
    window = torch.zeros(5, dtype=torch.float64)
    start = window_start = last_report = time.perf_counter()
    for epoch in range(cfg.epochs):
        batches = _shard_batches(shard, cfg.micro_batch_size)
        while True:
            rows = next(batches, None)
            alive = torch.tensor([0 if rows is None else 1], dtype=torch.int64)
            dist.all_reduce(alive, op=dist.ReduceOp.MIN)  # every worker must still have a batch
            if alive.item() == 0:
                break
            batch, dropped = feeder.batch(rows, epoch)
            totals["dropped"] += len(dropped)
            weight = 1.0
            if batch is None:
                placeholder = placeholder or feeder.placeholder()
                batch, weight = placeholder, 0.0
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine.micro_step(batch, weight)
            lr = engine.lr()  # the rate this step applies (the scheduler advances inside step())
            stepped = engine.step()
            micro_steps += 1
            empty += weight == 0.0
            if weight:
                n = batch["input_ids"].shape[0]
                toks = int(batch["attention_mask"].sum())
                window[:4] += torch.tensor([float(loss.detach()), 1.0, n, toks], dtype=torch.float64)
            if not stepped:
                continue
            step += 1
            now = time.perf_counter()
            if rank == 0 and (now - last_report >= REPORT_INTERVAL_S or step == config["total_steps"]):
                window[4] = 1.0  # decided on rank 0 and summed to all: every rank reports at the same steps
            dist.all_reduce(window)
            report_now = bool(window[4] > 0)
            elapsed = max(now - window_start, 1e-9)
            step_loss = float(window[0] / window[1]) if window[1] else float("nan")
            first_loss = step_loss if first_loss is None else first_loss
            last_loss = step_loss
            totals["samples"] += int(window[2])
            totals["tokens"] += int(window[3])
            record = {
                "stage": config["stage"], "run": config["run_name"], "step": step, "epoch": epoch,
                "loss": step_loss, "lr": lr,
                "samples_per_s": float(window[2]) / elapsed, "tokens_per_s": float(window[3]) / elapsed,
            }
            window.zero_()
            window_start = now
            if rank == 0:
                log.info("[%s] step %d/%d epoch %d loss %.4f lr %.2e %.1f samples/s %.0f tok/s", config["run_name"],
                         step, config["total_steps"], epoch, step_loss, record["lr"], record["samples_per_s"],
                         record["tokens_per_s"])
                if config["metrics_path"]:
                    _append_jsonl(config["metrics_path"], record)
            if report_now:  # a Ray Train V2 report is a cross-worker barrier (~2 s on CPU): throttle it
                ray.train.report(record)
                last_report = now
    dropped = torch.tensor([totals["dropped"], empty], dtype=torch.int64)
    dist.all_reduce(dropped)
    return {
        "stage": config["stage"], "steps": step, "micro_steps_per_worker": micro_steps, "samples": totals["samples"],
        "tokens": totals["tokens"], "dropped_samples": int(dropped[0]), "empty_micro_batches": int(dropped[1]),
        "first_loss": first_loss,
        "final_loss": last_loss, "wall_time_s": time.perf_counter() - start, "world_size": world,
    }


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------
# Strategies: one small interface (micro_step, step, lr, save), one class per backend
# --------------------------------------------------------------------------------------------


def _save_hf(model: Any, processor: Any, output_dir: str, lora: LoraConfig, summary: dict) -> None:
    """Write model + processor in HF format via a temporary folder renamed into place (rank 0 only).

    ``train_summary.json`` beside the weights carries the run's summary metrics back to the driver
    (Ray Train V2 keeps only checkpoint-attached metrics in its Result) and documents the checkpoint.
    """
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    if hasattr(model, "peft_config"):
        if lora.merge:
            model = model.merge_and_unload()  # plain Llava model with W + BA folded in
        else:
            model.save_pretrained(tmp)  # adapter (+ trained projector) beside the base checkpoint
            processor.save_pretrained(tmp)
            _rename_into_place(tmp, out)
            return
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    _rename_into_place(tmp, out)


def _rename_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()  # train_student checked it is empty
    os.rename(tmp, out)


class _DDPEngine:
    """torch DDP with manual accumulation (no_sync between boundaries), optional autocast + GradScaler."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, cfg: TrainConfig, accum: int, device: Any) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel

        self.module = model
        self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer, self.scheduler, self.cfg, self.accum, self.device = optimizer, scheduler, cfg, accum, device
        self.micro = 0
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None

    def _boundary(self) -> bool:
        return (self.micro + 1) % self.accum == 0

    def micro_step(self, batch: dict, weight: float) -> Any:
        """Forward + backward of one micro batch (gradients all-reduced only on the boundary); the loss."""
        import contextlib

        import torch

        sync = contextlib.nullcontext() if self._boundary() else self.model.no_sync()
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with sync:
            with autocast:
                loss = self.model(**batch).loss
            scaled = loss * (weight / self.accum)
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss

    def step(self) -> bool:
        import torch

        boundary = self._boundary()
        self.micro += 1
        if not boundary:
            return False
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return True

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, output_dir: str, processor: Any, lora: LoraConfig, rank: int, summary: dict) -> None:
        if rank == 0:
            _save_hf(self.module.to("cpu"), processor, output_dir, lora, summary)


class _DeepSpeedEngine:
    """DeepSpeed ZeRO 0-3 over the process group Ray Train created; our AdamW + schedule passed in."""

    def __init__(self, model: Any, optimizer: Any, scheduler: Any, cfg: TrainConfig, accum: int, device: Any) -> None:
        import deepspeed

        from mmdc.train.deepspeed_config import deepspeed_config

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        self.cfg = cfg
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, accum),
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
        self.device = device

    def micro_step(self, batch: dict, weight: float) -> Any:
        """Forward + backward of one micro batch; DeepSpeed accumulates and scales by the steps itself."""
        if self.cfg.precision != "fp32" and "pixel_values" in batch:
            dtype = next(p.dtype for p in self.engine.module.parameters())  # fp16/bf16 after initialize
            batch = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
        loss = self.engine(**batch).loss
        self.engine.backward(loss * weight)
        return loss

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return bool(boundary)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, output_dir: str, processor: Any, lora: LoraConfig, rank: int, summary: dict) -> None:
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            import deepspeed

            # All ranks gather the partitioned weights; rank 0 writes them while they are whole.
            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if rank == 0:
                    _save_hf(module, processor, output_dir, lora, summary)
            return
        if rank == 0:
            _save_hf(module, processor, output_dir, lora, summary)
