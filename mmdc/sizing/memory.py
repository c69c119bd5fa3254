"""Memory estimators: what one engine replica or one trainer worker holds, per GPU (or in host RAM on a CPU).

Each estimator returns a ``Memory``: named parts in bytes, so a plan can show where the memory goes
and a test can check one part at a time.

- **hf engine** (transformers ``generate``; one process holds the whole model on one device):
  weights in the engine's dtype, the KV cache of ``max_batch_size`` sequences at their longest
  (prompt with image tokens + ``max_new_tokens``), the prefill's peak activation of one layer, the
  vision tower's activations, and the logits (last position for generation; every position for
  likelihood scoring).
- **vLLM engine**: vLLM takes ``gpu_memory_utilization`` of every GPU of a replica and fills what its
  weight shard, its profiled activation peak and its runtime (CUDA context, CUDA graphs, NCCL) leave
  with KV cache; it refuses to start when that cache cannot hold one ``max_model_len`` sequence.
- **trainer worker**: the model states from DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``: pure
  arithmetic over parameter counts) for the trainable parameters, the frozen weights beside them,
  activations for ``micro_batch_size x max_length`` with or without gradient checkpointing, logits
  and loss, and DeepSpeed's communication buffers at its default bucket sizes (our DeepSpeed config
  sets none). Also the peaks outside the steady state (``load_bytes_per_param``): the load (the
  weights in the dtype ``mmdc/train/worker.py`` loads them in, before the strategy wraps them; under
  ZeRO-3 ``zero.Init`` partitions them as they are built) and the final save (ZeRO-3 consolidates the
  16-bit weights one module at a time onto rank 0's host RAM).
- **assembly** (``models.student_init: assemble``): the student's weights in the assembly dtype in one
  process, plus the fp32 copy of the embedding matrix that resizing it for ``<image>`` makes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from mmdc.sizing.architectures import Architecture
from mmdc.sizing.gpus import GIB

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}


def load_bytes_per_param(strategy: str, precision: str, zero_stage: int) -> int:
    """Bytes per parameter a trainer worker puts on its device at load (``mmdc.train.worker.load_dtype``).

    DDP keeps fp32 parameters (autocast and its GradScaler need them), as does fp32 training: 4. DeepSpeed
    in fp16 / bf16 at ZeRO 0-2 loads the 16-bit weights it trains (its optimizer keeps the fp32 master
    copy of the trainable part, in the model states): 2. ZeRO-3 builds the model under ``zero.Init``,
    which partitions every parameter as it is created: no whole copy at all (0).
    """
    if strategy == "deepspeed" and zero_stage == 3:
        return 0
    return 4 if strategy == "ddp" or precision == "fp32" else 2


# vLLM, per GPU of a replica: tokens of its profiling forward pass (max_num_batched_tokens; vLLM V1's
# default for the serving engine is 8192) and the runtime outside torch's allocator (CUDA context,
# CUDA graphs of the decode batch sizes, NCCL buffers with tensor parallelism): 0.5-1.5 GiB measured
# by vLLM's own startup log on A100/H100; 1.5 is on the safe side.
VLLM_PROFILE_TOKENS = 8192
VLLM_RUNTIME_GIB = 1.5

# A process on the CPU before its first tensor: Python with torch (CPU build), transformers and
# deepspeed or ray imported holds 426-442 MiB resident (ru_maxrss, torch 2.13 / transformers 5.25).
CPU_PROCESS_RUNTIME_GIB = 0.45


def on_cpu(mem: Memory) -> Memory:
    """``mem`` for a process on the CPU: its parts plus the interpreter and libraries' resident memory."""
    return Memory(
        (*mem.parts, Part("process runtime", int(CPU_PROCESS_RUNTIME_GIB * GIB), "python + torch + transformers")),
        mem.notes,
    )


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class Memory:
    """Named parts of one process's memory on one device."""

    parts: tuple[Part, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    def get(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    def describe(self) -> str:
        """``weights 24.87 + KV cache 3.05 + ... = 28.31 GiB``."""
        shown = [f"{p.name} {gib(p.bytes)}" for p in self.parts if p.bytes]
        return " + ".join(shown) + f" = {gib(self.total)} GiB"


def gib(n: float) -> str:
    """Bytes as GiB with three significant figures at most (``28.6``, ``2.42``, ``0.005``)."""
    value = n / GIB
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[dtype]


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def kv_cache_bytes(arch: Architecture, tokens: int, dtype: str, tensor_parallel: int = 1) -> int:
    """K and V for ``tokens`` tokens over all layers, on one of ``tensor_parallel`` GPUs."""
    return tokens * arch.text.kv_bytes_per_token * dtype_bytes(dtype) // max(tensor_parallel, 1)


def hf_engine(
    arch: Architecture,
    dtype: str,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    attention: str = "sdpa",
    score: bool = False,
) -> Memory:
    """One hf replica (the whole model on one device) generating ``batch`` rows at once.

    ``prompt_tokens`` includes the image tokens. ``score``: likelihood requests, one teacher-forced
    forward pass that keeps the logits of every position (``referee_scoring: likelihood``).
    """
    t, a = arch.text, dtype_bytes(dtype)
    seq = prompt_tokens + new_tokens
    parts = [
        Part("weights", arch.total * a, f"{arch.total / 1e9:.2f}B x {a} B ({dtype})"),
        Part(
            "KV cache",
            batch * kv_cache_bytes(arch, seq, dtype),
            f"{batch} x {seq} tokens x {t.kv_bytes_per_token * a / 2**20:.2f} MiB/token",
        ),
        # one decoder layer's prefill peak: residual + normed stream (2h) and the MLP's gate, up and product (3i)
        Part("prefill activations", batch * prompt_tokens * (2 * t.hidden + 3 * t.intermediate) * a),
    ]
    if attention == "eager":  # fp32 scores and their softmax in the dtype, [batch, heads, seq, seq]
        parts.append(Part("attention scores", batch * t.heads * seq * seq * (4 + a), "eager attention"))
    if arch.vision_layers:
        patches = arch.image_tokens + 1
        parts.append(Part("vision tower", batch * patches * (2 * arch.vision_hidden + arch.vision_intermediate) * a))
    logits_positions = prompt_tokens + new_tokens if score else 1
    parts.append(
        Part(
            "logits",
            batch * logits_positions * t.vocab * (a + 8 if score else 4),
            "every position (likelihood scoring)" if score else "last position",
        )
    )
    return Memory(tuple(parts))


@dataclass(frozen=True)
class VllmMemory:
    """One GPU of a vLLM replica: what vLLM takes, and the KV cache that leaves."""

    memory: Memory  # the parts, KV cache last (the rest of the budget)
    budget: int  # gpu_memory_utilization x the GPU's memory
    kv_tokens: int  # tokens the KV cache holds (all sequences together)


def vllm_engine(
    arch: Architecture,
    dtype: str,
    tensor_parallel: int,
    gpu_memory: int,
    gpu_memory_utilization: float,
    max_num_seqs: int,
) -> VllmMemory:
    """One GPU of a vLLM replica with ``tensor_parallel`` GPUs on a GPU with ``gpu_memory`` bytes."""
    t, a, tp = arch.text, dtype_bytes(dtype), max(tensor_parallel, 1)
    budget = int(gpu_memory_utilization * gpu_memory)
    fixed = [
        Part("weights", arch.total * a // tp, f"{arch.total / 1e9:.2f}B x {a} B ({dtype}) / {tp} GPU"),
        Part(
            "activation peak",
            VLLM_PROFILE_TOKENS * (2 * t.hidden + 3 * t.intermediate // tp) * a + max_num_seqs * t.vocab * 4,
            f"profile run over {VLLM_PROFILE_TOKENS} tokens + sampler logits",
        ),
        Part("runtime", int(VLLM_RUNTIME_GIB * GIB), "CUDA context, CUDA graphs, NCCL"),
    ]
    kv = budget - sum(p.bytes for p in fixed)
    per_token = kv_cache_bytes(arch, 1, dtype, tp)
    kv_tokens = max(kv, 0) // per_token
    parts = (*fixed, Part("KV cache", max(kv, 0), f"{kv_tokens:,} tokens"))
    return VllmMemory(Memory(parts), budget, kv_tokens)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainerMemory:
    """One trainer worker's device: the steady state and the peaks at load and save, plus host RAM."""

    steady: Memory
    load: int  # bytes on the device while loading (before the strategy wraps the model)
    save: int  # bytes on the device while saving the final checkpoint
    host_per_node: int  # host RAM per node: the largest of DeepSpeed's CPU estimate, the load and the save
    estimator: str  # which estimator gave the model states, with its arguments
    host_reason: str = ""  # what the host figure is
    load_dtype: str = ""  # the dtype the workers load the student in (mmdc.train.worker.load_dtype)
    states_host: int = 0  # DeepSpeed's CPU estimate per node (offloaded states, initialisation copies)
    save_host: int = 0  # rank 0's host RAM for the consolidated weights while it writes the checkpoint

    @property
    def peak(self) -> int:
        return max(self.steady.total, self.load, self.save)


class _NoCpuAcceleratorHint(logging.Filter):
    """Drops DeepSpeed's import-time "Setting accelerator to CPU" warning: planning on a machine without a
    GPU is the point here, and DeepSpeed prints it on stdout, in the middle of the plan."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def _quiet_deepspeed_import() -> None:
    """Install the filter on DeepSpeed's logger ("DeepSpeed") before its first import; a no-op afterwards."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoCpuAcceleratorHint) for f in logger.filters):
        logger.addFilter(_NoCpuAcceleratorHint())


def deepspeed_defaults() -> dict[str, int]:
    """DeepSpeed's default bucket sizes (elements), which apply since our DeepSpeed config sets none."""
    _quiet_deepspeed_import()
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig()
    return {"reduce_bucket_size": int(zero.reduce_bucket_size), "prefetch_bucket_size": int(zero.prefetch_bucket_size)}


def model_states(
    trainable: int,
    largest_layer: int,
    strategy: str,
    zero_stage: int,
    workers: int,
    gpus_per_node: int,
    offload_optimizer: bool,
) -> tuple[int, int, str]:
    """(device bytes, host bytes per node, description) for the trainable parameters' weights, grads and Adam.

    ZeRO-2 and ZeRO-3 call DeepSpeed's estimators. ZeRO-0/1 and DDP, for which DeepSpeed has none,
    use the same byte counts: 16-bit weights and gradients, fp32 master weights, gradients and
    Adam moments (2 + 2 + 4 + 4 + 8 = 20 bytes per parameter; ZeRO-1 partitions the fp32 part), and
    for DDP fp32 weights, gradients and AdamW moments (16 bytes) plus its gradient buckets (4).
    """
    nodes = max(1, math.ceil(workers / max(gpus_per_node, 1)))
    per_node = workers / nodes
    if strategy == "ddp":
        return 20 * trainable, 0, "DDP: fp32 weights, grads, AdamW moments and gradient buckets (20 B/param)"
    _quiet_deepspeed_import()
    if zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=trainable,
            largest_layer_params=largest_layer,
            num_gpus_per_node=per_node,
            num_nodes=nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=False,
            zero_init=True,
        )
        return (
            gpu,
            cpu,
            (
                f"DeepSpeed estimate_zero3_model_states_mem_needs({trainable / 1e9:.3g}B trainable, "
                f"largest layer {largest_layer / 1e6:.1f}M, {workers} GPUs, "
                f"offload_optimizer={offload_optimizer})"
            ),
        )
    if zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=trainable, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=offload_optimizer
        )
        return (
            gpu,
            cpu,
            (
                f"DeepSpeed estimate_zero2_model_states_mem_needs({trainable / 1e9:.3g}B trainable, "
                f"{workers} GPUs, offload_optimizer={offload_optimizer})"
            ),
        )
    if zero_stage == 1:
        return 4 * trainable + 16 * trainable // workers, 0, "ZeRO-1: 16-bit weights + grads, fp32 states / GPUs"
    return 20 * trainable, 0, "ZeRO-0: 16-bit weights + grads and fp32 states on every GPU (20 B/param)"


def training_activations(arch: Architecture, micro_batch: int, seq: int, dtype: str, checkpointing: bool) -> int:
    """Saved activations of the language model for one micro batch of ``seq`` tokens (image tokens included).

    Per decoder layer (elements per token): the residual, two norm outputs, q / k / v, the attention
    output and o_proj's (8 x hidden), the MLP's gate, up, activation and product (4 x intermediate);
    SDPA / memory-efficient attention keeps no [seq x seq] matrix. With gradient checkpointing only
    each layer's input stays, and one layer is recomputed (and its gradients live) at a time.
    """
    t, a = arch.text, dtype_bytes(dtype)
    per_layer = micro_batch * seq * (8 * t.hidden + 4 * t.intermediate) * a
    if checkpointing:
        return t.layers * micro_batch * seq * t.hidden * a + 2 * per_layer
    return t.layers * per_layer


def logits_bytes(arch: Architecture, micro_batch: int, seq: int, dtype: str) -> int:
    """Logits and loss: the logits in the dtype, their fp32 copy, the saved log-softmax and its gradient."""
    return micro_batch * seq * arch.text.vocab * (dtype_bytes(dtype) + 12)


def trainer(
    arch: Architecture,
    stage: str,
    *,
    strategy: str,
    zero_stage: int,
    precision: str,
    workers: int,
    micro_batch: int,
    max_length: int,
    checkpointing: bool,
    offload_optimizer: bool = False,
    lora_targets: tuple[str, ...] = (),
    lora_r: int = 0,
    gpus_per_node: int = 8,
) -> TrainerMemory:
    """One worker of a ``workers``-wide trainer of ``arch`` in ``stage`` (align or tune)."""
    lora_r = lora_r if stage == "tune" else 0  # the loop ignores LoRA in align
    trainable = arch.trainable(stage, lora_targets, lora_r)
    # With LoRA the whole base model is frozen and peft trains a copy of the projector (modules_to_save).
    frozen = arch.total if lora_r else arch.total - trainable
    weight_bytes = 4 if strategy == "ddp" or precision == "fp32" else 2
    states, host, how = model_states(
        trainable, arch.largest_layer, strategy, zero_stage, workers, gpus_per_node, offload_optimizer
    )
    shard = workers if strategy == "deepspeed" and zero_stage == 3 else 1
    parts = [
        Part("model states", states, how),
        Part(
            "frozen weights",
            frozen * weight_bytes // shard,
            f"{frozen / 1e9:.3g}B x {weight_bytes} B" + (f" / {workers} (ZeRO-3)" if shard > 1 else ""),
        ),
    ]
    if strategy == "ddp" and precision != "fp32":
        parts.append(Part("autocast copies", 2 * arch.total, "16-bit casts of the weights kept for backward"))
    parts.append(
        Part(
            "activations",
            training_activations(arch, micro_batch, max_length, precision, checkpointing),
            f"{micro_batch} x {max_length} tokens, checkpointing {'on' if checkpointing else 'off'}",
        )
    )
    parts.append(Part("logits + loss", logits_bytes(arch, micro_batch, max_length, precision)))
    if strategy == "deepspeed":
        buckets = deepspeed_defaults()
        if zero_stage == 3:
            buffers = 2 * (
                min(buckets["reduce_bucket_size"], trainable) + min(buckets["prefetch_bucket_size"], arch.total)
            )
        elif zero_stage in (1, 2):
            buffers = 2 * 2 * min(buckets["reduce_bucket_size"], trainable)  # two 16-bit buckets (overlap_comm)
        else:
            buffers = 0
        parts.append(Part("DeepSpeed buffers", buffers, "default reduce / prefetch buckets"))
    steady = Memory(tuple(parts))
    zero3 = strategy == "deepspeed" and zero_stage == 3
    per_param = load_bytes_per_param(strategy, precision, zero_stage)
    if zero3:  # zero.Init: this worker's partition, and one module gathered at a time while the weights load
        load = weight_bytes * arch.total // workers + weight_bytes * arch.largest_layer
    else:
        load = per_param * arch.total
    save = 0
    if zero3:  # _zero3_consolidated_16bit_state_dict: one module gathered at a time, copied to rank 0's CPU
        save = (
            steady.total - steady.get("activations") - steady.get("logits + loss") + weight_bytes * arch.largest_layer
        )
    nodes = max(1, math.ceil(workers / max(gpus_per_node, 1)))
    per_node = math.ceil(workers / nodes)
    # Host RAM at load: ZeRO-3 reads the checkpoint on rank 0 only (the other ranks build on the meta device);
    # otherwise every worker of a node materialises the student in its load dtype before moving it.
    load_host = weight_bytes * arch.total if zero3 else per_node * per_param * arch.total
    # Host RAM at save: rank 0 holds the whole model on the CPU while it writes (the consolidated 16-bit
    # weights under ZeRO-3, the module's tensors copied off the device otherwise; DDP moves its fp32 module).
    save_host = weight_bytes * arch.total
    states_reason = (
        "DeepSpeed's CPU estimate: the offloaded optimizer states"
        if offload_optimizer
        else "DeepSpeed's CPU estimate: fp32 copies at initialisation"
    ) + ", with its 1.5x buffer factor"
    load_reason = (
        "rank 0 reading the checkpoint; the other ranks build on the meta device"
        if zero3
        else f"{per_node} workers' {_dtype_name(per_param)} copies while loading"
    )
    save_reason = f"rank 0's {_dtype_name(weight_bytes)} copy of the whole model at the final save"
    host_per_node, reason = max(
        [(host, states_reason), (load_host, load_reason), (save_host, save_reason)], key=lambda c: c[0]
    )
    return TrainerMemory(
        steady=steady,
        load=load,
        save=save,
        host_per_node=host_per_node,
        estimator=how,
        host_reason=reason,
        load_dtype="partitioned by zero.Init" if zero3 else _dtype_name(per_param),
        states_host=host,
        save_host=save_host,
    )


def _dtype_name(nbytes: int) -> str:
    return {4: "fp32", 2: "16-bit"}.get(nbytes, f"{nbytes}-byte")


def assembly(arch: Architecture, dtype: str) -> Memory:
    """Host RAM of the process that assembles ``arch`` (``models.student_init: assemble``) in ``dtype``.

    ``assemble_llava`` loads both parts in ``dtype``, moves them into the LLaVA skeleton without a copy
    and resizes the LM's embeddings and head for ``<image>``: a new matrix each, whose added row is drawn
    from the old rows' mean and covariance, computed on an fp32 copy (transformers'
    ``_init_added_embeddings_weights_with_mean``). The checkpoint is written by reference (safetensors).
    """
    a = dtype_bytes(dtype)
    embedding = arch.text.vocab * arch.text.hidden if arch.text else 0
    return on_cpu(
        Memory(
            (
                Part("weights", arch.total * a, f"{arch.total / 1e9:.3g}B x {a} B ({dtype})"),
                Part(
                    "embedding resize",
                    embedding * (a + 4) + 4 * (arch.text.hidden**2 if arch.text else 0),
                    "the new matrix + an fp32 copy of the old one + its covariance",
                ),
            )
        )
    )
