"""The DeepSpeed config dict for one student training stage, derived from ``TrainConfig``.

Why a function and not a JSON file: the batch arithmetic (micro batch x accumulation x workers =
global batch) and the precision block must follow the run config, or DeepSpeed and our own
progress/throughput numbers disagree about what a step is.

Choices:

- **No ``optimizer`` / ``scheduler`` blocks.** ``mmdc.train.worker`` builds AdamW and the warmup +
  cosine/linear/constant schedule in torch and passes both to ``deepspeed.initialize``. One code path
  for the DeepSpeed and DDP strategies, and DeepSpeed's fused CPU/GPU Adam builds (which need a
  compiler at run time) are never involved.
- **fp16** gets dynamic loss scaling (``loss_scale = 0``), the V100 setting; **bf16** is plain;
  **fp32** has neither block.
- ``train_batch_size`` is left out: DeepSpeed derives it from micro batch x accumulation x world
  size, so the same dict works for any number of workers.
- ZeRO-3: ``stage3_gather_16bit_weights_on_model_save`` lets the final save consolidate the 16-bit
  weights one module at a time onto rank 0 (``DeepSpeedStrategy.save``), which writes the HF checkpoint.
- ``offload_optimizer`` (ZeRO-2/3) keeps the optimizer states in pinned CPU memory. The loop's torch
  AdamW then steps on the CPU copies, which DeepSpeed only allows with ``zero_force_ds_cpu_optimizer``
  off. DeepSpeed's own ``DeepSpeedCPUAdam`` (SIMD, several times faster on a 7B model) would need its
  C++ extension compiled at run time on every GPU node (a compiler and ninja there): not used, so the
  plan's time estimate for offload assumes torch AdamW's speed (``mmdc/sizing/timing.py``).
- Works on CPU (gloo): no communication overlap, which CPU collectives do not benefit from.
"""

from __future__ import annotations

from typing import Any

from mmdc.config import TrainConfig


def deepspeed_config(train_cfg: TrainConfig, grad_accum: int) -> dict[str, Any]:
    """A DeepSpeed config for ``train_cfg`` with ``grad_accum`` micro steps per optimizer step."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    if not 0 <= train_cfg.zero_stage <= 3:
        raise ValueError(f"zero_stage must be 0..3, got {train_cfg.zero_stage}")
    on_gpu = train_cfg.gpus_per_worker > 0
    zero: dict[str, Any] = {
        "stage": train_cfg.zero_stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu,  # overlapping gloo all-reduce with backward buys nothing on CPU
    }
    if train_cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if train_cfg.offload_optimizer:
        if train_cfg.zero_stage < 2:
            raise ValueError(f"offload_optimizer needs ZeRO stage 2 or 3, got {train_cfg.zero_stage}")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train_cfg.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our loop reports progress; keep DeepSpeed's own log quiet
        "wall_clock_breakdown": False,
    }
    if train_cfg.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # the loop's torch AdamW steps the offloaded states
    if train_cfg.precision == "fp16":
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    elif train_cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train_cfg.precision != "fp32":
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {train_cfg.precision!r}")
    return config
