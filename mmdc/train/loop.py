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

Resume: every ``checkpoint_every_steps`` optimizer steps every rank writes the resumable state
(DeepSpeed ``save_checkpoint``: trainable weights, optimizer, LR schedule, loss scaler; for DDP the
same from rank 0; plus, per rank, the step counters and the torch / CUDA / Python / NumPy RNG
states) into ``<output_dir>.train_state/step_<n>/``. ``latest.json`` is written last, by rank 0,
after a barrier, so it only ever names a complete state. A worker that starts (a new
``train_student`` call with the same ``output_dir``, or Ray Train restarting a failed worker group
inside one call) restores that state and skips the micro batches of the current epoch that the
restored step had consumed; the state folder is deleted once the final checkpoint is in place.
Why our own folder and not ``ray.train.report(checkpoint=...)``: a V2 report is a barrier that
also copies the whole state into ``storage_path`` (about 100 GB for a 7B full tune), while
``output_dir`` must already be on storage every worker shares, so each rank writes its shard there
once.

What resumes exactly: the shard order is deterministic because the trainer ingests with
``preserve_order`` (which also turns off Ray Data's locality-aware split), there is no shuffle, and
Eq. 2's image position is a hash of (seed, id, epoch). On the same cluster shape the resumed run
sees the same micro batches as an uninterrupted one; the final weights then match up to float
reduction order (bit-identical on CPU/gloo in our test; GPU kernels such as atomics-based
reductions can differ in the last bits). Caveats: Ray Data derives its block count from the
cluster's CPUs, so resuming on a different cluster shape may regroup rows between ranks in the
interrupted epoch (the step count still continues correctly); a caller that adds
``random_shuffle`` must pass it a seed. Steps after the last saved state are trained again and
appear twice in ``metrics_path`` (the later lines are the ones that count).

Fault injection (tests only): with ``MMDC_TRAIN_STOP_AFTER_STEPS=N`` in the environment of the
process that calls ``train_student``, every worker raises right after optimizer step N (after
that step's state save, if one falls there).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
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
STATE_SUFFIX = ".train_state"  # <output_dir>.train_state/ holds the resumable state while training runs
STATE_MARKER = "latest.json"  # names the latest complete state; written last
STOP_AFTER_ENV = "MMDC_TRAIN_STOP_AFTER_STEPS"  # fault injection for tests (see module docstring)
# TrainConfig keys that may change between an interrupted attempt and its resume (they do not
# change what the saved state means); every other key, and the data size, must match.
RESUME_FREE_KEYS = ("enabled", "checkpoint_every_steps", "cpus_per_worker", "gpus_per_worker")


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
    resume: bool = True,
) -> TrainResult:
    """Train the student on ``dataset`` with Ray Train and save it in HF format into ``output_dir``.

    ``stage`` "align" trains only the projector on caption pairs; "tune" trains projector + LM on
    conversations (LoRA on the LM when ``train_cfg.lora.enabled``). Raises ValueError before any
    worker starts when the data cannot make one optimizer step, or ``output_dir`` already holds
    files (a finished checkpoint is never overwritten). ``max_failures``: times Ray Train restarts a
    failed worker group (from the initial checkpoint; the metrics file then repeats those steps).
    On an overloaded machine Ray Train V2's placement-group cleaner can mistake a busy controller
    for a dead one and tear the workers down; one retry absorbs that (and resumes from the latest
    saved state, if any).

    ``resume``: continue from ``<output_dir>.train_state/`` when an earlier, interrupted call left
    one (refused with the differing keys when it was saved by a different setup); False deletes it
    and starts from ``init_checkpoint``.
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
        "state_dir": str(train_state_dir(out)),
        "fingerprint": resume_fingerprint(stage, init_checkpoint, seed, num_rows, total_steps, train_cfg),
        "stop_after_steps": int(os.environ.get(STOP_AFTER_ENV) or 0),
    }
    resume_from = _prepare_state(Path(loop_config["state_dir"]), loop_config["fingerprint"], resume)
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
        dataset_config=_ordered_ingest(),
    )
    log.info("%s: %d rows, %d planned optimizer steps (accum %d), strategy %s%s",
             run_name, num_rows, total_steps, accum, train_cfg.strategy,
             f", resuming after step {resume_from}" if resume_from else "")
    result = trainer.fit()
    if result.error:
        raise result.error
    if not (out / SUMMARY_FILE).exists():
        raise RuntimeError(f"{run_name}: training finished but no checkpoint was written to {out}")
    shutil.rmtree(loop_config["state_dir"], ignore_errors=True)  # the final checkpoint supersedes it
    metrics = json.loads((out / SUMMARY_FILE).read_text())
    return TrainResult(checkpoint_dir=str(out), metrics=metrics)


def train_state_dir(output_dir: str | os.PathLike) -> Path:
    """Where resumable state for ``output_dir`` lives: a sibling, so ``output_dir`` only holds a final checkpoint."""
    out = Path(output_dir).resolve()
    return out.with_name(out.name + STATE_SUFFIX)


def read_train_state(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of the latest complete saved state for ``output_dir`` (``step``, ``epoch``, ...), or None."""
    marker = train_state_dir(output_dir) / STATE_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def resume_fingerprint(stage: str, init_checkpoint: str, seed: int, num_rows: int, total_steps: int,
                       cfg: TrainConfig) -> dict[str, Any]:
    """What must be equal for a saved state to be resumed: the same start, data size and training setup."""
    train = {f"train.{k}": v for k, v in asdict(cfg).items() if k not in RESUME_FREE_KEYS}
    return {"stage": stage, "init_checkpoint": str(init_checkpoint), "seed": seed, "num_rows": num_rows,
            "total_steps": total_steps, **train}


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every fingerprint key that differs (JSON-normalised, so lists equal tuples)."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def _prepare_state(state_dir: Path, fingerprint: dict[str, Any], resume: bool) -> int:
    """The step a resume continues after (0: fresh start). Refuses a state saved by a different setup."""
    marker = state_dir / STATE_MARKER
    if not resume or not marker.exists():
        shutil.rmtree(state_dir, ignore_errors=True)  # nothing usable: no half-written leftovers either
        return 0
    saved = json.loads(marker.read_text())
    diff = resume_mismatch(saved["fingerprint"], fingerprint)
    if diff:
        raise ValueError(f"{state_dir} holds training state from a different setup ({'; '.join(diff)}); "
                         "delete it or call with resume=False to start over")
    return int(saved["step"])


def _ordered_ingest() -> Any:
    """Ray Train data config whose shards see the same rows in the same order on every run (for resume).

    ``preserve_order`` makes Ray Data's streaming split hand blocks out round-robin by row count
    instead of by locality and completion order; the cost is some cross-node reads on a multi-node
    cluster, which training data (small next to the model) affords.
    """
    from ray.data import DataContext
    from ray.train import DataConfig

    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return DataConfig(execution_options=options)


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _train_worker(config: dict[str, Any]) -> None:
    """Body of one Ray Train worker: load, freeze, wrap, restore saved state, train over the shard, save."""
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
    state = _TrainState(Path(config["state_dir"]), config["fingerprint"])
    progress = state.restore(engine, rank)
    log.info("[%s] rank %d ready after %.1fs (model, %s engine%s)", config["run_name"], rank,
             time.perf_counter() - started, cfg.strategy,
             f", resumed after step {progress.step}" if progress.step else "")
    metrics = _Loop(engine, feeder, cfg, config, rank, device, state, progress).run()
    engine.save(config["output_dir"], processor, lora=cfg.lora, rank=rank, summary={**metrics, "world_size": world})
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


@dataclass
class _Progress:
    """Where training stands; each rank saves its copy with every resumable state."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch being trained
    micro_in_epoch: int = 0  # micro batches of that epoch consumed so far
    micro_steps: int = 0  # micro batches over all epochs (this rank)
    empty: int = 0  # zero-weight placeholder micro batches (this rank)
    dropped: int = 0  # samples dropped by formatting (this rank)
    samples: int = 0  # supervised samples, summed over ranks
    tokens: int = 0  # tokens of those samples, summed over ranks
    first_loss: float | None = None
    last_loss: float | None = None
    elapsed_s: float = 0.0  # training wall time, earlier attempts included
    resumed_from: int = 0  # step the current attempt started after (0: from init_checkpoint)


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _TrainState:
    """``<output_dir>.train_state/``: ``step_<n>/`` (engine state, one ``rank_<r>.pt`` per rank), ``latest.json``."""

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        self.root, self.fingerprint = root, fingerprint

    def save(self, engine: Any, progress: _Progress, rank: int) -> None:
        """Every rank writes its part; rank 0 then points ``latest.json`` at it and drops older states."""
        import torch
        import torch.distributed as dist

        tag = f"step_{progress.step:08d}"
        engine.save_state(self.root, tag, rank)
        (self.root / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"progress": asdict(progress), "rng": _rng_state()}, self.root / tag / f"rank_{rank}.pt")
        dist.barrier()  # every rank's files are on disk before the marker names them
        if rank == 0:
            marker = {"tag": tag, "step": progress.step, "epoch": progress.epoch,
                      "micro_in_epoch": progress.micro_in_epoch, "fingerprint": self.fingerprint}
            tmp = self.root / (STATE_MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=1))
            os.replace(tmp, self.root / STATE_MARKER)
            for old in self.root.glob("step_*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)

    def restore(self, engine: Any, rank: int) -> _Progress:
        """The saved progress with weights, optimizer, schedule and RNG restored; a fresh one without a state."""
        import torch

        marker = self.root / STATE_MARKER
        if not marker.exists():
            return _Progress()
        tag = json.loads(marker.read_text())["tag"]
        engine.load_state(self.root, tag)
        saved = torch.load(self.root / tag / f"rank_{rank}.pt", weights_only=False)  # our own file
        _set_rng_state(saved["rng"])
        progress = _Progress(**saved["progress"])
        progress.resumed_from = progress.step
        return progress


class _Loop:
    """The training loop proper over this worker's shard; ``run`` returns summary metrics (equal on every rank)."""

    def __init__(self, engine: Any, feeder: _Feeder, cfg: TrainConfig, config: dict[str, Any], rank: int,
                 device: Any, state: _TrainState, progress: _Progress) -> None:
        import torch

        self.engine, self.feeder, self.cfg, self.config = engine, feeder, cfg, config
        self.rank, self.device, self.state, self.p = rank, device, state, progress
        self.placeholder: dict[str, Any] | None = None
        # loss_sum, micro_count, samples, tokens since the last step; [4] = rank 0's 'report now' vote.
        # Every tensor a collective sees lives on the worker's device: NCCL (GPU workers) has no CPU tensors.
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
            "stage": self.config["stage"], "steps": p.step, "micro_steps_per_worker": p.micro_steps,
            "samples": p.samples, "tokens": p.tokens, "dropped_samples": int(dropped[0]),
            "empty_micro_batches": int(dropped[1]), "first_loss": p.first_loss, "final_loss": p.last_loss,
            "wall_time_s": self.elapsed(), "resumed_from_step": p.resumed_from,
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
        loss = self.engine.micro_step(batch, weight)
        lr = self.engine.lr()  # the rate this step applies (the scheduler advances inside step())
        stepped = self.engine.step()
        self.p.micro_steps += 1
        self.p.micro_in_epoch += 1
        self.p.empty += weight == 0.0
        if weight:
            n, toks = batch["input_ids"].shape[0], int(batch["attention_mask"].sum())
            self.window[:4] += torch.tensor([float(loss.detach()), 1.0, n, toks], dtype=torch.float64,
                                            device=self.device)
        if stepped:
            self.finish_step(lr, epoch)

    def finish_step(self, lr: float, epoch: int) -> None:
        """Count the step, log and record it, report it (throttled), save state when due, maybe stop (tests)."""
        import torch.distributed as dist

        p, config, total = self.p, self.config, self.config["total_steps"]
        p.step += 1
        now = time.perf_counter()
        if self.rank == 0 and (now - self.last_report >= REPORT_INTERVAL_S or p.step == total):
            self.window[4] = 1.0  # decided on rank 0 and summed to all: every rank reports at the same steps
        dist.all_reduce(self.window)
        w = self.window
        report_now = bool(w[4] > 0)
        span = max(now - self.window_start, 1e-9)
        step_loss = float(w[0] / w[1]) if w[1] else float("nan")
        p.first_loss = step_loss if p.first_loss is None else p.first_loss
        p.last_loss = step_loss
        p.samples += int(w[2])
        p.tokens += int(w[3])
        p.elapsed_s = self.elapsed()
        record = {
            "stage": config["stage"], "run": config["run_name"], "step": p.step, "epoch": epoch,
            "loss": step_loss, "lr": lr, "samples_per_s": float(w[2]) / span, "tokens_per_s": float(w[3]) / span,
        }
        w.zero_()
        self.window_start = now
        if self.rank == 0:
            eta = eta_seconds(p.step - p.resumed_from, now - self.start, total - p.step)
            log.info(progress_line(config["run_name"], p.step, total, p.elapsed_s, eta, epoch, step_loss, lr,
                                   record["samples_per_s"], record["tokens_per_s"]))
            if config["metrics_path"]:
                _append_jsonl(config["metrics_path"], record)
        if report_now:  # a Ray Train V2 report is a cross-worker barrier (~2 s on CPU): throttle it
            ray.train.report(record)
            self.last_report = now
        every = self.cfg.checkpoint_every_steps
        if every and p.step % every == 0 and p.step < total:  # the last step is followed by the final save
            self.state.save(self.engine, p, self.rank)
        if config["stop_after_steps"] and p.step == config["stop_after_steps"]:
            raise RuntimeError(f"{STOP_AFTER_ENV}={p.step}: stopping after step {p.step} (fault injection)")


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m05s`` / ``7s``: short enough for a progress line."""
    s = max(int(round(seconds)), 0)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def eta_seconds(steps_done: int, seconds_spent: float, steps_left: int) -> float | None:
    """Remaining time at this attempt's pace; None before its first step (no pace yet)."""
    if steps_done <= 0:
        return None
    return seconds_spent / steps_done * max(steps_left, 0)


def progress_line(run: str, step: int, total: int, elapsed_s: float, eta_s: float | None, epoch: int, loss: float,
                  lr: float, samples_per_s: float, tokens_per_s: float, width: int = 20) -> str:
    """One log line that reads like a progress bar: bar, step i/N, percent, elapsed, ETA, then the numbers."""
    frac = min(step / total, 1.0) if total > 0 else 1.0
    filled = int(frac * width)
    bar = "#" * filled + "-" * (width - filled)
    eta = format_duration(eta_s) if eta_s is not None else "?"
    return (f"[{run}] [{bar}] step {step}/{total} {100 * frac:5.1f}% | {format_duration(elapsed_s)} elapsed, "
            f"ETA {eta} | epoch {epoch} loss {loss:.4f} lr {lr:.2e} | {samples_per_s:.1f} samples/s "
            f"{tokens_per_s:.0f} tok/s")


def _append_jsonl(path: str, record: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------------
# Strategies: one small interface (micro_step, step, lr, save, save_state, load_state), one class per backend
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

    def save_state(self, root: Path, tag: str, rank: int) -> None:
        """Rank 0 writes trainable weights, optimizer, schedule and scaler (DDP replicas are identical)."""
        import torch

        if rank != 0:
            return
        (root / tag).mkdir(parents=True, exist_ok=True)
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in self.module.state_dict().items() if k in trainable}  # frozen: from init_checkpoint
        torch.save({"model": weights, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "micro": self.micro,
                    "scaler": self.scaler.state_dict() if self.scaler else None}, root / tag / "ddp.pt")

    def load_state(self, root: Path, tag: str) -> None:
        import torch

        saved = torch.load(root / tag / "ddp.pt", map_location=self.device, weights_only=False)  # our own file
        unexpected = self.module.load_state_dict(saved["model"], strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"saved training state {root / tag} does not fit this model: {unexpected[:5]}")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.scaler and saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        self.micro = saved["micro"]


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

    def save_state(self, root: Path, tag: str, rank: int) -> None:
        """DeepSpeed's own checkpoint (every rank its ZeRO shard); frozen weights are left out, they come
        from ``init_checkpoint`` again (with LoRA on a 7B LM they are nearly all of it)."""
        self.engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True)

    def load_state(self, root: Path, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)  # frozen keys absent
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the saved training state {root / tag}")
