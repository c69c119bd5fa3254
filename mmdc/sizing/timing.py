"""Wall-time estimates per phase, from stated throughput assumptions.

Nothing here is measured: every figure is a constant below with the reason for its value, printed
by ``python -m mmdc.plan`` under "Assumptions", so a user can see what a run would cost and which
assumption to doubt. Change a constant when a measurement on the real hardware says otherwise
(``benchmarks/results/`` is where such measurements go).

- **Decoding** is memory-bound: each step of a replica reads its weight shard once plus the KV cache
  of every sequence in flight, at a share of the GPU's datasheet bandwidth.
- **Prefill** (the prompt with its image tokens) is compute-bound: 2 x parameters FLOPs per token at
  a share of the GPU's peak.
- **Training** takes 2 FLOPs per parameter per token forward and 4 backward (the weight gradients
  only where parameters train), one more forward with gradient checkpointing, at an MFU; an
  offloaded optimizer adds its CPU step per optimizer step.
- **How much work**: the pool sizes per iteration follow the config's pool policy from the number of
  instructions (``--rows``, else ``data.max_instructions``, else the paper's 220K or the synthetic
  world's size) and a hard / accepted fraction per assessment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmdc.config import Config, eval_benchmarks
from mmdc.sizing.architectures import Architecture
from mmdc.sizing.gpus import Gpu

# --- inference ------------------------------------------------------------------------------
# Share of datasheet memory bandwidth one decode step achieves: vLLM's paged, CUDA-graph decode
# reaches 60-80% on A100/H100 in its own benchmarks; transformers generate with a dynamic cache and
# Python per step reaches far less (we assume half of vLLM's).
DECODE_BANDWIDTH_EFFICIENCY = {"vllm": 0.6, "hf": 0.3}
# Share of peak tensor FLOPS while processing a prompt (large matmuls; hf pads every batch to its longest).
PREFILL_MFU = {"vllm": 0.5, "hf": 0.3}
# A static hf batch runs until its longest reply: decode steps per batch = this x the mean reply (capped).
HF_LONGEST_REPLY_FACTOR = 1.5
# Mean reply length in tokens, capped by the role's max_new_tokens. Teacher / student answers: LLaVA-Instruct's
# answers average ~100-200 tokens (detailed descriptions are longer, conversation turns shorter); the referee
# writes one score sentence, the augmentor one question; a LLaVA-Bench judge review is a paragraph.
MEAN_REPLY_TOKENS = {"teacher": 160, "student": 160, "referee": 24, "augmentor": 24, "judge": 200}
# Mean reply per benchmark (mmdc/eval/harness.py caps: 32 for letters and world answers, 512 for LLaVA-Bench).
EVAL_REPLY_TOKENS = {"scienceqa": 4, "seed": 4, "world": 12, "world_mc": 4, "llavabench": 160}
EVAL_MAX_NEW_TOKENS = {"scienceqa": 32, "seed": 32, "llavabench": 512, "world": 32, "world_mc": 32}
JUDGE_MAX_NEW_TOKENS = 256  # mmdc/eval/harness.py JUDGE_MAX_NEW_TOKENS
# Items per benchmark (test splits): ScienceQA test 4,241; SEED-Bench image dimensions 1-9: 14,233;
# LLaVA-Bench (COCO) 90. The world's test split is test_images x questions_per_image.
EVAL_ITEMS = {"scienceqa": 4241, "seed": 14233, "llavabench": 90}

# --- prompts (tokens, image tokens added per model) ------------------------------------------
# The chat template's role tags and separators, and the Table 6 prompt texts of mmdc/roles.py (their
# system and user text without the filled-in parts: ~1.4 tokens per word for a LLaMA tokenizer).
TEMPLATE_TOKENS = 16
ROLE_PROMPT_TOKENS = {"teacher": 45, "student": 45, "referee": 180, "augmentor": 130, "eval": 60, "judge": 400}
QUESTION_TOKENS = 24  # a LLaVA-Instruct question (~15 words); benchmark questions with options are longer (eval)
CAPTION_TOKENS = 20  # a stage 1 caption (BLIP / LAION captions: ~12 words)

# --- training --------------------------------------------------------------------------------
# Model FLOPs utilisation of fp16/bf16 training: 0.35-0.45 is typical for 7B models with DeepSpeed on
# NVLink nodes; ZeRO-3 gathers parameters in every forward and backward (lower); DDP all-reduces only.
TRAIN_MFU = {"ddp": 0.35, 0: 0.35, 1: 0.35, 2: 0.35, 3: 0.3}
# torch AdamW stepping offloaded fp32 states on the CPU (parameters per second per worker; DeepSpeed's
# fused CPUAdam would be several times faster, but the loop passes torch's AdamW).
CPU_ADAM_PARAMS_PER_S = 1e8

# --- how much work -----------------------------------------------------------------------------
PAPER_INSTRUCTIONS = 220_000  # paper 4.1.3: LLaVA-Instruct 80K conversations -> 220K single-turn questions
PAPER_QUESTIONS_PER_IMAGE = 220 / 80  # questions per image (per conversation) in D_sin
LLAVA_PRETRAIN_PAIRS = 558_128  # blip_laion_cc_sbu_558k.json; the noun-phrase filter keeps fewer
HARD_FRACTION = 0.4  # share of the cache pool an assessment calls hard (paper: +84K new from 220K in iteration 1)
ACCEPTED_FRACTION = 0.85  # share of the augmentor's questions that pass ROUGE-L < 0.7 and the one-sentence check


@dataclass(frozen=True)
class Workload:
    """Rows per phase and iteration (index 0 = iteration 1) and per-sample lengths."""

    instructions: int  # D_sin
    source: str  # where that number came from
    captions: int  # stage 1 pairs
    questions_per_image: float
    teach: tuple[int, ...]  # rows the teacher answers (the rest are in its answer cache)
    tune: tuple[int, ...]  # tuning-pool rows trained on
    assess: tuple[int, ...]  # cache-pool rows assessed
    augment: tuple[int, ...]  # hard rows the augmentor writes a question for
    eval_items: dict[str, int]  # items per benchmark, per evaluation


def workload(cfg: Config, rows: int | None = None, captions: int | None = None) -> Workload:
    """How many rows each phase handles in each iteration, following ``calibration.pool_update``."""
    if cfg.data.source == "world":
        world = cfg.data.world
        n, source, qpi = (
            world.num_images * world.questions_per_image,
            "the synthetic world's size",
            world.questions_per_image,
        )
        pairs = world.num_images
    else:
        n, source, qpi = PAPER_INSTRUCTIONS, "the paper's 220K (section 4.1.3)", PAPER_QUESTIONS_PER_IMAGE
        pairs = LLAVA_PRETRAIN_PAIRS
        if cfg.data.max_instructions:
            n, source = min(n, cfg.data.max_instructions), "data.max_instructions"
    if rows:
        n, source = rows, "--rows"
    pairs = captions or pairs
    teach, tune, assess, augment = [], [], [], []
    tuning, cache, new = n, n, n
    random = cfg.calibration.selection == "random"
    for _ in range(cfg.run.iterations):
        teach.append(new)  # the teacher answers only what its cache has not seen
        tune.append(tuning)
        assess.append(0 if random else cache)
        hard = round(cache * (cfg.calibration.random_fraction if random else HARD_FRACTION))
        augment.append(hard)
        accepted = round(hard * ACCEPTED_FRACTION)
        easy = accepted  # balanced with as many easy instructions (already answered)
        tuning = accepted + easy if cfg.calibration.pool_update == "refresh" else tuning + easy
        cache, new = cache + accepted, accepted
    items = {}
    for name in eval_benchmarks(cfg):
        count = (
            cfg.data.world.test_images * cfg.data.world.questions_per_image
            if name.startswith("world")
            else EVAL_ITEMS[name]
        )
        items[name] = min(count, cfg.eval.limit) if cfg.eval.limit else count
    return Workload(n, source, pairs, qpi, tuple(teach), tuple(tune), tuple(assess), tuple(augment), items)


def mean_reply(role: str, max_new_tokens: int) -> int:
    return min(MEAN_REPLY_TOKENS[role], max_new_tokens)


@dataclass(frozen=True)
class Rate:
    """One replica's throughput for one kind of request."""

    rows_per_s: float
    tokens_per_s: float  # generated tokens per second
    batch: int  # sequences decoded together


def generation_rate(
    arch: Architecture,
    gpu: Gpu,
    backend: str,
    dtype_bytes: int,
    tensor_parallel: int,
    batch: int,
    prompt_tokens: int,
    reply_tokens: int,
    max_new_tokens: int,
) -> Rate:
    """Rows per second of one replica answering prompts of ``prompt_tokens`` with ``reply_tokens`` on average.

    ``batch``: sequences in flight (hf: max_batch_size; vLLM: max_num_seqs, limited by its KV cache).
    """
    tp = max(tensor_parallel, 1)
    peak = (gpu.tflops_16 if dtype_bytes == 2 else gpu.tflops_32) * 1e12 * tp
    prefill_flops = 2 * (arch.total - arch.vision) * prompt_tokens + 2 * arch.vision * (arch.image_tokens + 1)
    prefill_s = prefill_flops / (peak * PREFILL_MFU[backend])  # per row
    context = prompt_tokens + reply_tokens / 2  # mean sequence length while decoding
    read = (arch.total * dtype_bytes + batch * context * arch.text.kv_bytes_per_token * dtype_bytes) / tp
    step_s = read / (gpu.bandwidth_gbs * 1e9 * DECODE_BANDWIDTH_EFFICIENCY[backend])
    if backend == "hf":
        steps = min(max_new_tokens, math.ceil(HF_LONGEST_REPLY_FACTOR * reply_tokens))
        batch_s = steps * step_s + batch * prefill_s
        return Rate(batch / batch_s, batch * reply_tokens / batch_s, batch)
    row_s = reply_tokens * step_s / batch + prefill_s  # continuous batching: batch rows decode together
    return Rate(1 / row_s, reply_tokens / row_s, batch)


def scoring_rate(arch: Architecture, gpu: Gpu, dtype_bytes: int, batch: int, tokens: int) -> Rate:
    """Likelihood requests (hf): one teacher-forced forward pass per row, compute-bound like a prefill."""
    peak = (gpu.tflops_16 if dtype_bytes == 2 else gpu.tflops_32) * 1e12
    row_s = (2 * (arch.total - arch.vision) * tokens + 2 * arch.vision * (arch.image_tokens + 1)) / (
        peak * PREFILL_MFU["hf"]
    )
    return Rate(1 / row_s, 0.0, batch)


def training_seconds(
    arch: Architecture,
    gpu: Gpu,
    stage: str,
    samples: float,
    tokens_per_sample: float,
    *,
    workers: int,
    strategy: str,
    zero_stage: int,
    precision: str,
    checkpointing: bool,
    lora: bool,
    trainable: int,
    global_batch: int,
    offload_optimizer: bool,
) -> float:
    """Seconds for one pass over ``samples`` samples of ``tokens_per_sample`` tokens."""
    lm = arch.total - arch.vision
    weight_grads = stage == "tune" and not lora  # align and LoRA: activation gradients through a frozen LM
    per_token = 2 * lm + (4 if weight_grads else 2) * lm + (2 * lm if checkpointing else 0)
    per_sample = per_token * tokens_per_sample + 2 * arch.vision * (arch.image_tokens + 1)
    peak = (gpu.tflops_32 if precision == "fp32" else gpu.tflops_16) * 1e12
    mfu = TRAIN_MFU["ddp" if strategy == "ddp" else zero_stage]
    seconds = samples * per_sample / (workers * peak * mfu)
    if offload_optimizer:
        steps = math.ceil(samples / global_batch)
        seconds += steps * trainable / workers / CPU_ADAM_PARAMS_PER_S
    return seconds


def assumptions() -> list[str]:
    """The constants above as lines for the plan's output."""
    return [
        f"decode: memory-bound, weights + KV cache read per step at {DECODE_BANDWIDTH_EFFICIENCY['vllm']:.0%} (vllm) / "
        f"{DECODE_BANDWIDTH_EFFICIENCY['hf']:.0%} (hf) of datasheet bandwidth; an hf batch decodes "
        f"{HF_LONGEST_REPLY_FACTOR}x the mean reply (its longest)",
        f"prefill and likelihood scoring: 2 x params FLOPs/token at {PREFILL_MFU['vllm']:.0%} (vllm) / "
        f"{PREFILL_MFU['hf']:.0%} (hf) of peak 16-bit tensor FLOPS",
        "mean replies (tokens, capped by max_new_tokens): "
        + ", ".join(f"{k} {v}" for k, v in MEAN_REPLY_TOKENS.items()),
        f"prompts: {TEMPLATE_TOKENS} template + Table 6 text ("
        + ", ".join(f"{k} {v}" for k, v in ROLE_PROMPT_TOKENS.items() if k in ("teacher", "referee", "augmentor"))
        + f") + {QUESTION_TOKENS}-token question + the model's image tokens",
        f"training: (6 x params, 4 x for a frozen LM, +2 x with checkpointing) FLOPs/token at MFU "
        f"{TRAIN_MFU[2]:.2f} (DDP, ZeRO-0/1/2) / {TRAIN_MFU[3]:.2f} (ZeRO-3); offloaded AdamW "
        f"{CPU_ADAM_PARAMS_PER_S:.0e} params/s per worker",
        f"work: pools per iteration from the instructions, {HARD_FRACTION:.0%} of the cache pool hard, "
        f"{ACCEPTED_FRACTION:.0%} of new questions accepted; teacher answers cached (only new rows are taught); "
        f"{PAPER_QUESTIONS_PER_IMAGE:.2f} questions per image in LLaVA-Instruct; "
        f"stage 1: {LLAVA_PRETRAIN_PAIRS:,} LLaVA-Pretrain pairs (before the noun-phrase filter)",
    ]
