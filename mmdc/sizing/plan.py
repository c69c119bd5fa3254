"""The plan of a run: per phase, what is deployed or trained on which GPUs, whether it fits and what it costs.

``check(cfg, gpu, gpus)`` resolves everything that can be known without a GPU: the models' sizes
(``architectures``), every engine replica's and trainer worker's memory on the named GPU
(``memory``), whether each backend, dtype and attention kernel runs on its compute capability
(``gpus``), and a wall time per phase (``timing``). What cannot fit or run becomes a ``Problem``:
one line naming the phase, the config key to change and the alternatives. ``python -m mmdc.plan``
prints ``Plan.render()``; ``mmdc.run`` calls ``check`` before it starts anything.

Phases are the driver's (``mmdc/actors/driver.py``): align (stage 1), then per iteration teach,
tune, eval (the student after each tune; also after align), assess and augment, and eval_teacher
once. Engines run in the inference phases, trainers in align and tune, never both at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from mmdc.config import Config, EngineConfig, TrainConfig, assemble_dtype, eval_benchmarks
from mmdc.sizing import memory, timing
from mmdc.sizing.architectures import Architecture, ModelNotFound, assemble, resolve
from mmdc.sizing.gpus import MIN_CAPABILITY, Gpu, accelerator_matches, get_gpu
from mmdc.sizing.memory import Memory, gib

PHASES = ("align", "teach", "tune", "eval", "assess", "augment", "eval_teacher")
GPUS_PER_NODE = 8  # nodes for DeepSpeed's host-memory estimate: workers fill nodes of this many GPUs


@dataclass(frozen=True)
class Problem:
    """Something that cannot fit or run: the phase, the config key to change, and the line a user reads."""

    phase: str
    key: str
    message: str
    # Problems of one kind on one key merge into one line across phases, keeping the largest figure.
    kind: str = field(default="", compare=False)
    size: int = field(default=0, compare=False)

    def __str__(self) -> str:
        return f"{self.phase}: {self.message}"


@dataclass
class Deployment:
    """One engine or trainer inside a phase: its processes, what each holds, and how fast it works."""

    name: str  # config section: engines.teacher, tune, ...
    model: str  # teacher | student
    summary: str  # backend / strategy, replicas or workers x GPUs, dtype, ...
    processes: int  # replicas or workers (0: nothing deployed)
    gpus_each: float  # GPUs per process (0: on the CPU)
    memory: Memory | None = None  # per process (per GPU when on a GPU)
    per_gpu: int = 0  # bytes on the fullest GPU (processes sharing a GPU added up)
    lines: list[str] = field(default_factory=list)  # extra detail (load / save peaks, KV capacity, rates)

    @property
    def gpus(self) -> float:
        return self.processes * self.gpus_each

    @property
    def host(self) -> int:
        """Host RAM of the processes that run on the CPU."""
        return self.processes * self.memory.total if self.memory is not None and not self.gpus_each else 0


@dataclass
class PhasePlan:
    name: str
    runs: int  # times this phase runs in one run
    deployments: list[Deployment] = field(default_factory=list)
    seconds: float | None = None  # all runs together; None: not estimated
    time_lines: list[str] = field(default_factory=list)
    host_extra: int = 0  # host RAM beyond CPU processes (DeepSpeed's CPU side, load copies), per node

    @property
    def gpus(self) -> float:
        return sum(d.gpus for d in self.deployments)

    @property
    def per_gpu(self) -> int:
        return max((d.per_gpu for d in self.deployments if d.gpus_each), default=0)

    @property
    def host(self) -> int:
        return sum(d.host for d in self.deployments) + self.host_extra


@dataclass
class Plan:
    """Everything ``check`` found; ``problems`` empty means the config fits and runs on the named GPUs."""

    gpu: Gpu | None
    gpus: int
    models: dict[str, Architecture]
    phases: list[PhasePlan]
    workload: timing.Workload | None
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)  # worth knowing, not fatal
    config_name: str = ""
    host_memory: bool = True  # False: trainers on the CPU are not sized (check's host_memory)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self, problems: bool = True) -> str:
        return render(self, problems)


# --------------------------------------------------------------------------------------------
# Prompt shapes per phase and engine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One kind of request an engine serves in a phase: prompt and reply lengths, for memory and time."""

    role: str
    prompt: int  # tokens, image tokens included
    max_new: int  # the cap (memory)
    mean_reply: int  # the mean (time)
    score: bool = False  # a likelihood request (one forward, all-position logits)
    per_row: float = 1.0  # requests per row of the phase
    mean_prompt: int = 0  # the mean prompt (time), when it differs from the longest (memory)

    @property
    def time_prompt(self) -> int:
        return self.mean_prompt or self.prompt


def _prompt(role: str, image_tokens: int, extra: int = 0) -> int:
    return timing.TEMPLATE_TOKENS + timing.ROLE_PROMPT_TOKENS[role] + timing.QUESTION_TOKENS + image_tokens + extra


def requests(cfg: Config, phase: str, engine: str, arch: Architecture) -> list[Request]:
    """What ``engine`` is asked in ``phase`` (empty: it is not deployed there)."""
    r, img = cfg.roles, arch.image_tokens
    if engine == "teacher":
        if phase == "teach":
            return [
                Request(
                    "teacher",
                    _prompt("teacher", img),
                    r.teacher.max_new_tokens,
                    timing.mean_reply("teacher", r.teacher.max_new_tokens),
                )
            ]
        if phase == "assess" and cfg.calibration.selection == "hard":
            answers = r.teacher.max_new_tokens + r.student.max_new_tokens
            if cfg.calibration.referee_scoring == "likelihood":  # each answer scored by one forward pass
                longest = max(r.teacher.max_new_tokens, r.student.max_new_tokens)
                mean = timing.mean_reply("teacher", longest)
                return [
                    Request(
                        "likelihood",
                        _prompt("teacher", img, longest),
                        0,
                        0,
                        score=True,
                        per_row=2,
                        mean_prompt=_prompt("teacher", img, mean),
                    )
                ]
            mean_answers = timing.mean_reply("teacher", r.teacher.max_new_tokens) + timing.mean_reply(
                "student", r.student.max_new_tokens
            )
            return [
                Request(
                    "referee",
                    _prompt("referee", img, answers),
                    r.referee.max_new_tokens,
                    timing.mean_reply("referee", r.referee.max_new_tokens),
                    per_row=2,
                    mean_prompt=_prompt("referee", img, mean_answers),
                )
            ]
        if phase == "augment":
            return [
                Request(
                    "augmentor",
                    _prompt("augmentor", img),
                    r.augmentor.max_new_tokens,
                    timing.mean_reply("augmentor", r.augmentor.max_new_tokens),
                )
            ]
        if phase == "eval" and "llavabench" in eval_benchmarks(cfg) and not cfg.eval.llavabench.judge_url:
            cap = cfg.eval.max_new_tokens or timing.EVAL_MAX_NEW_TOKENS["llavabench"]
            return [
                Request(
                    "judge",
                    timing.TEMPLATE_TOKENS + timing.ROLE_PROMPT_TOKENS["judge"] + 2 * cap,
                    timing.JUDGE_MAX_NEW_TOKENS,
                    timing.MEAN_REPLY_TOKENS["judge"],
                )
            ]
        if phase == "eval_teacher" and cfg.eval.teacher:
            return _eval_requests(cfg, img)
        return []
    if phase == "assess" and cfg.calibration.selection == "hard":
        return [
            Request(
                "student",
                _prompt("student", img),
                r.student.max_new_tokens,
                timing.mean_reply("student", r.student.max_new_tokens),
            )
        ]
    if phase == "eval":
        return _eval_requests(cfg, img)
    return []


def _eval_requests(cfg: Config, image_tokens: int) -> list[Request]:
    out = []
    for name in eval_benchmarks(cfg):
        cap = cfg.eval.max_new_tokens or timing.EVAL_MAX_NEW_TOKENS[name]
        out.append(
            Request(f"eval:{name}", _prompt("eval", image_tokens), cap, min(timing.EVAL_REPLY_TOKENS[name], cap))
        )
    return out


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def _engine_gpus(cfg: Config, name: str) -> float:
    e = cfg.engines[name]
    return 0.0 if e.backend == "openai" else e.replicas * e.num_gpus


def _needs_gpus(cfg: Config) -> list[str]:
    """Config keys that ask for GPUs (empty: a CPU run)."""
    keys = [f"engines.{n}.num_gpus" for n, e in cfg.engines.items() if e.backend != "openai" and e.num_gpus > 0]
    keys += [
        f"{s}.gpus_per_worker"
        for s in ("align", "tune")
        if getattr(cfg, s).enabled and getattr(cfg, s).gpus_per_worker > 0
    ]
    if cfg.data.clip_filter.enabled and cfg.data.clip_filter.num_gpus > 0:
        keys.append("data.clip_filter.num_gpus")
    return keys


def check(
    cfg: Config,
    gpu: str | Gpu | None = None,
    gpus: int | None = None,
    *,
    model_configs: Mapping[str, str] | None = None,
    rows: int | None = None,
    captions: int | None = None,
    gpus_per_node: int = GPUS_PER_NODE,
    config_name: str = "",
    host_memory: bool = True,
) -> Plan:
    """Plan ``cfg`` on ``gpus`` GPUs of kind ``gpu`` (None: a CPU run); ``Plan.problems`` lists what cannot work.

    ``gpus`` defaults to the largest phase's need. ``model_configs``: config.json paths for model ids
    the plan cannot size offline. ``rows`` / ``captions``: instructions in D_sin and stage 1 pairs
    for the time estimate (default: from the config, else the paper's). An unknown ``gpu`` name raises
    ValueError naming the known ones. ``host_memory=False`` leaves out the host RAM of trainers on the CPU
    (DeepSpeed's estimators, whose import costs seconds): ``mmdc.run`` checks a CPU run that way, where host
    RAM is only reported, never refused.
    """
    kind = get_gpu(gpu) if isinstance(gpu, str) else gpu
    plan = Plan(gpu=kind, gpus=0, models={}, phases=[], workload=None, config_name=config_name)
    plan.host_memory = host_memory
    asks = _needs_gpus(cfg)
    if asks and kind is None:
        plan.problems.append(
            Problem(
                "plan",
                "--gpu",
                f"the config asks for GPUs ({', '.join(asks)}): name the GPU "
                "kind with --gpu (e.g. v100-32gb, a100-80gb, h100-80gb)",
            )
        )
    _resolve_models(cfg, plan, model_configs)
    plan.workload = timing.workload(cfg, rows, captions)
    for name in PHASES:
        phase = _phase(cfg, plan, name, gpus_per_node)
        if phase is not None:
            plan.phases.append(phase)
    plan.gpus = int(gpus) if gpus is not None else math.ceil(max((p.gpus for p in plan.phases), default=0))
    if kind is not None:
        for phase in plan.phases:
            if phase.gpus > plan.gpus + 1e-9:
                keys = [
                    f"{d.name}.{'replicas' if d.name.startswith('engines') else 'num_workers'}"
                    for d in phase.deployments
                    if d.gpus
                ]
                plan.problems.append(
                    Problem(
                        phase.name,
                        keys[0] if keys else "--gpus",
                        f"needs {phase.gpus:g} GPUs but the cluster has {plan.gpus}: lower "
                        f"{' or '.join(keys)}, or plan with --gpus {math.ceil(phase.gpus)}",
                    )
                )
    plan.problems, plan.notes = _merge(plan.problems), _merge(plan.notes)
    return plan


def _merge(items: list[Problem]) -> list[Problem]:
    """One line per problem: the same key and message in several phases becomes one line naming them all."""
    merged: dict[tuple[str, str], Problem] = {}
    for item in items:
        group = (item.key, item.kind or item.message)
        seen = merged.get(group)
        if seen is None:
            merged[group] = item
        else:
            worst = item if item.size > seen.size else seen
            merged[group] = Problem(
                f"{seen.phase}, {item.phase}", item.key, worst.message, item.kind, max(item.size, seen.size)
            )
    return list(merged.values())


def _resolve_models(cfg: Config, plan: Plan, model_configs: Mapping[str, str] | None) -> None:
    m = cfg.models
    for role, spec in (("teacher", m.teacher), ("student", m.student_init)):
        key = "models.teacher" if role == "teacher" else "models.student_init"
        try:
            if spec == "assemble":
                arch = assemble(m.vision_tower, m.language_model, m.projector, model_configs, assemble_dtype(cfg))
            else:
                arch = resolve(spec, model_configs)
        except ModelNotFound as err:
            plan.problems.append(Problem("models", key, str(err)))
            continue
        if arch.kind != "llava":
            plan.problems.append(
                Problem(
                    "models",
                    key,
                    f"{key} {spec!r} is a {arch.kind} model; engines serve "
                    "LLaVA-family models (vision tower + projector + LM)",
                )
            )
            continue
        plan.models[role] = arch
    student = plan.models.get("student")
    if m.student_init == "assemble" and student is not None:
        dtype = assemble_dtype(cfg)
        held = memory.assembly(student, dtype)
        plan.notes.append(
            Problem(
                "models",
                "models.student_init",
                f"the student is assembled once, in {dtype} (models.assemble_dtype), by a Ray task that asks for "
                f"{gib(held.total)} GiB of memory ({held.describe()}; mmdc/actors/assembly.py), on any node "
                "with that much free, not in the driver",
            )
        )


def _phase(cfg: Config, plan: Plan, name: str, gpus_per_node: int) -> PhasePlan | None:
    k = cfg.run.iterations
    if name in ("align", "tune"):
        train: TrainConfig = getattr(cfg, name)
        if not train.enabled or (name == "tune" and k == 0) or "student" not in plan.models:
            return None
        phase = PhasePlan(name, 1 if name == "align" else k)
        _trainer(cfg, plan, phase, train, gpus_per_node)
        return phase
    runs = {
        "teach": k,
        "assess": k,
        "augment": k,
        "eval": k + 1 if eval_benchmarks(cfg) else 0,
        "eval_teacher": 1 if eval_benchmarks(cfg) and cfg.eval.teacher else 0,
    }[name]
    if runs == 0:
        return None
    phase = PhasePlan(name, runs)
    seconds: list[float] = []  # per engine: the engines of a phase work concurrently
    for engine in ("teacher", "student"):
        arch = plan.models.get(engine)
        if arch is None:
            continue
        asked = requests(cfg, name, engine, arch)
        if asked:
            s = _engine(cfg, plan, phase, engine, arch, asked)
            if s is not None:
                seconds.append(s)
    if not phase.deployments:
        return None
    if plan.gpu is not None and seconds:
        phase.seconds = max(seconds)
    return phase


# --- engines -------------------------------------------------------------------------------------


def _dtype(e: EngineConfig, arch: Architecture) -> str:
    if e.dtype != "auto":
        return e.dtype
    if e.backend == "vllm":  # vLLM's auto: fp16 for fp32 / fp16 checkpoints, bf16 for bf16 ones
        return "bfloat16" if arch.checkpoint_dtype == "bfloat16" else "float16"
    return arch.checkpoint_dtype


def _engine(
    cfg: Config, plan: Plan, phase: PhasePlan, engine: str, arch: Architecture, asked: list[Request]
) -> float | None:
    """Add ``engines.<engine>`` to ``phase``; return its seconds over all runs of the phase (None: unknown)."""
    e, key, gpu = cfg.engines[engine], f"engines.{engine}", plan.gpu
    if e.backend == "openai":
        phase.deployments.append(
            Deployment(key, engine, f"openai endpoint {e.base_url} ({e.model_name}): nothing deployed", 0, 0.0)
        )
        return None
    dtype = _dtype(e, arch)
    on_gpu = e.num_gpus > 0 and gpu is not None
    attention = e.attention
    what = f"{e.backend}, {e.replicas} replica{'s' if e.replicas != 1 else ''} x {e.num_gpus:g} GPU, {dtype}, " + (
        f"tensor parallel {e.tensor_parallel_size}, max_num_seqs {e.max_batch_size}, max_model_len {e.max_model_len}"
        if e.backend == "vllm"
        else f"attention {attention}, batch {e.max_batch_size}"
    )
    dep = Deployment(key, engine, what, e.replicas, e.num_gpus if on_gpu else 0.0)
    phase.deployments.append(dep)
    if on_gpu:
        _capabilities(plan, phase.name, key, e, dtype, arch)
    longest = max(asked, key=lambda r: r.prompt + r.max_new)
    vm = None
    if e.backend == "vllm":
        if gpu is None:
            plan.problems.append(
                Problem(phase.name, f"{key}.backend", f"{key}.backend=vllm needs a GPU: use backend hf on a CPU")
            )
            return None
        vm = memory.vllm_engine(
            arch, dtype, e.tensor_parallel_size, gpu.memory_bytes, e.gpu_memory_utilization, e.max_batch_size
        )
        dep.memory, dep.per_gpu = vm.memory, vm.budget
        seq = longest.prompt + longest.max_new
        dep.lines.append(
            f"KV cache holds {vm.kv_tokens:,} tokens = {vm.kv_tokens // max(seq, 1)} sequences of "
            f"{seq} (longest request: {longest.role}, {longest.prompt} prompt + {longest.max_new} new)"
        )
        _check_vllm(plan, phase.name, key, e, arch, gpu, vm, seq)
    else:
        score = any(r.score for r in asked)
        attn = "eager" if attention == "eager" else "sdpa"
        mem = memory.hf_engine(arch, dtype, e.max_batch_size, longest.prompt, longest.max_new, attn, score=score)
        dep.memory = mem if on_gpu else memory.on_cpu(mem)
        sharing = min(e.replicas, int(1 // e.num_gpus)) if 0 < e.num_gpus < 1 else 1
        dep.per_gpu = mem.total * sharing
        if on_gpu:
            if e.num_gpus > 1:
                plan.notes.append(
                    Problem(
                        phase.name,
                        f"{key}.num_gpus",
                        f"{key}.num_gpus={e.num_gpus:g}, but the hf "
                        "backend puts the whole model on one GPU (mmdc/engines/hf.py): the other "
                        "GPUs of each replica idle",
                    )
                )
            _check_hf_fit(plan, phase.name, key, e, arch, dtype, gpu, dep.per_gpu, mem, longest)
    if not on_gpu or gpu is None:
        return None
    rows = _engine_rows(cfg, plan, phase.name, engine)
    total, rate_lines = 0.0, []
    for req, count in rows:
        if not count:
            continue
        a = memory.dtype_bytes(dtype)
        if req.score:
            rate = timing.scoring_rate(arch, gpu, a, e.max_batch_size, req.time_prompt)
        else:
            batch = e.max_batch_size
            if vm is not None:  # continuous batching: as many sequences as max_num_seqs and the KV cache allow
                batch = max(1, min(batch, vm.kv_tokens // max(req.time_prompt + req.mean_reply, 1)))
            rate = timing.generation_rate(
                arch,
                gpu,
                e.backend,
                a,
                e.tensor_parallel_size if vm else 1,
                batch,
                req.time_prompt,
                req.mean_reply,
                req.max_new,
            )
        s = count * req.per_row / (e.replicas * rate.rows_per_s)
        total += s
        rate_lines.append(
            f"{req.role}: {count * req.per_row:,.0f} requests at {rate.rows_per_s * e.replicas:.2f}/s "
            f"({e.replicas} x {rate.rows_per_s:.2f}/s"
            + (
                f", {rate.tokens_per_s:.0f} tok/s per replica at batch {rate.batch}"
                if rate.tokens_per_s
                else ", one forward each"
            )
            + f") = {_hours(s)}"
        )
    phase.time_lines += [f"{key}: {line}" for line in rate_lines]
    return total


def _engine_rows(cfg: Config, plan: Plan, phase: str, engine: str) -> list[tuple[Request, int]]:
    """(request, rows over all runs of the phase) for ``engine`` in ``phase``."""
    work = plan.workload
    arch = plan.models[engine]
    asked = requests(cfg, phase, engine, arch)
    if phase == "teach":
        return [(asked[0], sum(work.teach))]
    if phase == "assess":
        return [(asked[0], sum(work.assess))]
    if phase == "augment":
        return [(asked[0], sum(work.augment))]
    runs = cfg.run.iterations + 1 if phase == "eval" else 1
    out = []
    for req in asked:
        if req.role == "judge":
            out.append((req, work.eval_items.get("llavabench", 0) * runs))
        else:
            out.append((req, work.eval_items.get(req.role.split(":", 1)[1], 0) * runs))
    return out


def _capabilities(plan: Plan, phase: str, key: str, e: EngineConfig, dtype: str, arch: Architecture) -> None:
    gpu = plan.gpu
    cc = f"{gpu.name} has compute capability {gpu.capability:.1f}"
    if e.backend == "vllm" and not gpu.supports("vllm"):
        plan.problems.append(
            Problem(
                phase,
                f"{key}.backend",
                f"{key}.backend=vllm: current vLLM needs compute "
                f"capability >= {MIN_CAPABILITY['vllm']}, {cc}; use backend hf (one GPU per "
                "replica, dtype float16, attention sdpa) or a newer GPU",
            )
        )
    if dtype == "bfloat16" and not gpu.supports("bfloat16"):
        plan.problems.append(
            Problem(
                phase,
                f"{key}.dtype",
                f"{key}.dtype=bfloat16 needs compute capability >= "
                f"{MIN_CAPABILITY['bfloat16']}, {cc}; use float16 instead of bfloat16",
            )
        )
    old_gpu = gpu.capability < MIN_CAPABILITY["flash_attention_2"]
    if e.backend == "hf" and e.attention in ("auto", "xformers") and old_gpu:
        plan.notes.append(
            Problem(
                phase,
                f"{key}.attention",
                f"{key}.attention={e.attention} uses xformers where it is "
                f"installed; on {gpu.name} (sm_{gpu.capability * 10:.0f}) only builds with those "
                "CUTLASS kernels run: auto falls back to SDPA when the replica's test call of the "
                "kernel fails, an explicit xformers is refused at deploy",
            )
        )
    if e.backend == "vllm" and e.accelerator_type and not accelerator_matches(e.accelerator_type, gpu):
        plan.problems.append(
            Problem(
                phase,
                f"{key}.accelerator_type",
                f"{key}.accelerator_type={e.accelerator_type} "
                f"places replicas on {e.accelerator_type} nodes only, but the plan is for "
                f"{gpu.name} ({gpu.ray_accelerator}): set it to {gpu.ray_accelerator} or null",
            )
        )
    if e.backend == "vllm" and arch.projector_act == "linear":
        plan.problems.append(
            Problem(
                phase,
                f"{key}.backend",
                f"{key}.backend=vllm cannot load a linear-projector "
                "LLaVA (vLLM has no identity activation; mmdc/train/assembly.py): use backend hf "
                "for this model, or models.projector=mlp2x_gelu",
            )
        )


def _check_vllm(
    plan: Plan, phase: str, key: str, e: EngineConfig, arch: Architecture, gpu: Gpu, vm: memory.VllmMemory, seq: int
) -> None:
    if not gpu.supports("vllm"):
        return  # vLLM does not run there at all: the capability problem says so
    weights = vm.memory.get("weights")
    if vm.budget > gpu.usable_bytes:
        plan.problems.append(
            Problem(
                phase,
                f"{key}.gpu_memory_utilization",
                f"{key}.gpu_memory_utilization="
                f"{e.gpu_memory_utilization:g} asks {gib(vm.budget)} GiB of {gpu.name}, more "
                f"than the {gib(gpu.usable_bytes)} GiB free after the CUDA context; use <= "
                f"{gpu.usable_bytes / gpu.memory_bytes:.2f}",
            )
        )
    if vm.kv_tokens < e.max_model_len:
        fix = "raise tensor_parallel_size (and num_gpus)" if weights > vm.budget / 2 else "raise gpu_memory_utilization"
        plan.problems.append(
            Problem(
                phase,
                f"{key}.tensor_parallel_size",
                f"{key}: on {gpu.name} vLLM has "
                f"{gib(vm.budget)} GiB per GPU ({vm.memory.describe()}), room for "
                f"{vm.kv_tokens:,} KV tokens, less than one max_model_len={e.max_model_len} "
                f"sequence, so vLLM refuses to start: {fix}, lower {key}.max_model_len, or use "
                "fewer, larger replicas",
            )
        )
    if seq > e.max_model_len:
        plan.problems.append(
            Problem(
                phase,
                f"{key}.max_model_len",
                f"{key}.max_model_len={e.max_model_len} is "
                f"shorter than the longest request ({seq} tokens with its image and reply): "
                f"raise {key}.max_model_len or lower the roles' max_new_tokens",
                kind="short",
                size=seq,
            )
        )
    if arch.text.max_positions and e.max_model_len > arch.text.max_positions:
        plan.problems.append(
            Problem(
                phase,
                f"{key}.max_model_len",
                f"{key}.max_model_len={e.max_model_len} exceeds "
                f"the model's {arch.text.max_positions} positions, which vLLM refuses: use <= "
                f"{arch.text.max_positions}",
            )
        )


def _check_hf_fit(
    plan: Plan,
    phase: str,
    key: str,
    e: EngineConfig,
    arch: Architecture,
    dtype: str,
    gpu: Gpu,
    per_gpu: int,
    mem: Memory,
    longest: Request,
) -> None:
    if per_gpu <= gpu.usable_bytes:
        return
    weights = mem.get("weights")
    options = []
    if dtype == "float32":
        options.append("float16 instead of float32 (dtype)")
    if weights <= gpu.usable_bytes:
        fits = _max_batch(arch, dtype, gpu, longest, e.attention) if weights < gpu.usable_bytes else 0
        if fits:
            options.append(f"max_batch_size <= {fits}")
    if gpu.supports("vllm"):
        options.append("backend vllm with tensor_parallel_size 2")
    options.append("a GPU with more memory")
    key_to_change = f"{key}.dtype" if dtype == "float32" or weights > gpu.usable_bytes else f"{key}.max_batch_size"
    plan.problems.append(
        Problem(
            phase,
            key_to_change,
            f"{key} needs up to {gib(per_gpu)} GiB per GPU "
            f"({mem.describe()}) but {gpu.name} has {gib(gpu.usable_bytes)} usable: use "
            f"{', or '.join(options)}",
            kind="memory",
            size=per_gpu,
        )
    )


def _max_batch(arch: Architecture, dtype: str, gpu: Gpu, req: Request, attention: str) -> int:
    attn = "eager" if attention == "eager" else "sdpa"
    best = 0
    for batch in range(1, 257):
        if memory.hf_engine(arch, dtype, batch, req.prompt, req.max_new, attn, req.score).total > gpu.usable_bytes:
            break
        best = batch
    return best


# --- trainers -------------------------------------------------------------------------------------


def _trainer_memory(
    arch: Architecture, stage: str, t: TrainConfig, gpus_per_node: int, **change
) -> memory.TrainerMemory:
    args = dict(
        strategy=t.strategy,
        zero_stage=t.zero_stage,
        precision=t.precision,
        workers=t.num_workers,
        micro_batch=t.micro_batch_size,
        max_length=t.max_length,
        checkpointing=t.gradient_checkpointing,
        offload_optimizer=t.offload_optimizer,
        lora_targets=tuple(t.lora.target_modules),
        lora_r=t.lora.r if t.lora.enabled else 0,
        gpus_per_node=gpus_per_node,
    )
    args.update(change)
    return memory.trainer(arch, stage, **args)


def _trainer(cfg: Config, plan: Plan, phase: PhasePlan, t: TrainConfig, gpus_per_node: int) -> None:
    stage, arch, gpu = phase.name, plan.models["student"], plan.gpu
    on_gpu = t.gpus_per_worker > 0 and gpu is not None
    if not on_gpu and not plan.host_memory:  # nothing to fit on the CPU: skip DeepSpeed's estimators
        how = f"DeepSpeed ZeRO-{t.zero_stage}" if t.strategy == "deepspeed" else "DDP"
        phase.deployments.append(Deployment(stage, "student", f"{t.num_workers} workers, {how}, on the CPU", 0, 0.0))
        return
    lora = bool(t.lora.enabled and stage == "tune")
    tm = _trainer_memory(arch, stage, t, gpus_per_node)
    trainable = arch.trainable(stage, tuple(t.lora.target_modules), t.lora.r if lora else 0)
    how = (
        f"DeepSpeed ZeRO-{t.zero_stage}" + (" + optimizer offload" if t.offload_optimizer else "")
        if t.strategy == "deepspeed"
        else "DDP"
    )
    what = (
        f"{t.num_workers} workers x {t.gpus_per_worker:g} GPU, {how}, {t.precision}, micro batch "
        f"{t.micro_batch_size} x {t.max_length} tokens, checkpointing {'on' if t.gradient_checkpointing else 'off'}"
        f"; {_count(trainable)} of {_count(arch.total)} parameters train"
        + (
            f" (LoRA r={t.lora.r} on {', '.join(t.lora.target_modules)} + projector)"
            if lora
            else " (projector)"
            if stage == "align"
            else " (projector + language model)"
        )
    )
    sharing = min(t.num_workers, int(1 // t.gpus_per_worker)) if 0 < t.gpus_per_worker < 1 else 1
    dep = Deployment(
        stage,
        "student",
        what,
        t.num_workers,
        t.gpus_per_worker if on_gpu else 0.0,
        tm.steady if on_gpu else memory.on_cpu(tm.steady),
        tm.peak * sharing,
    )
    phase.deployments.append(dep)
    dep.lines.append(f"model states: {tm.estimator}")
    dep.lines.append(
        f"at load {gib(tm.load)} GiB ({tm.load_dtype}, mmdc/train/worker.py load_student)"
        + (
            f"; at the final save {gib(tm.save)} GiB (ZeRO-3 gathers one module at a time onto rank 0's CPU)"
            if tm.save
            else ""
        )
    )
    if on_gpu:
        phase.host_extra = tm.host_per_node
        dep.lines.append(f"host RAM per node: {gib(tm.host_per_node)} GiB ({tm.host_reason})")
    else:  # the workers' own memory is counted per process: add the offloaded states and rank 0's save copy
        phase.host_extra = (tm.states_host if t.offload_optimizer else 0) + tm.save_host
    if arch.text.max_positions and t.max_length > arch.text.max_positions:
        plan.notes.append(
            Problem(
                stage,
                f"{stage}.max_length",
                f"{stage}.max_length={t.max_length} exceeds the LM's {arch.text.max_positions} trained positions",
            )
        )
    if not on_gpu:
        return
    if t.precision == "bf16" and not gpu.supports("bfloat16"):
        plan.problems.append(
            Problem(
                stage,
                f"{stage}.precision",
                f"{stage}.precision=bf16 needs compute capability "
                f">= {MIN_CAPABILITY['bfloat16']}, {gpu.name} has {gpu.capability:.1f}: use "
                "fp16 instead of bf16 (dynamic loss scaling)",
            )
        )
    usable = gpu.usable_bytes
    if tm.steady.total * sharing > usable:
        plan.problems.append(
            Problem(
                stage,
                _first_key(stage, t, lora),
                f"each worker needs {gib(tm.steady.total)} GiB "
                f"per GPU ({tm.steady.describe()}) but {gpu.name} has {gib(usable)} usable; "
                + _alternatives(arch, stage, t, gpus_per_node, usable, "steady"),
            )
        )
    elif tm.save * sharing > usable:
        plan.problems.append(
            Problem(
                stage,
                f"{stage}.offload_optimizer",
                f"the final ZeRO-3 save needs {gib(tm.save)} GiB per GPU > {gib(usable)} usable on {gpu.name}, "
                "after the whole stage has run; " + _alternatives(arch, stage, t, gpus_per_node, usable, "save"),
            )
        )
    if tm.load * sharing > usable:
        plan.problems.append(
            Problem(
                stage,
                "--gpu",
                f"every worker loads the student ({tm.load_dtype}) onto its GPU before the strategy wraps it: "
                f"{gib(tm.load)} GiB > {gib(usable)} usable on {gpu.name} (mmdc/train/worker.py); use a GPU "
                f"with more memory or {stage}.strategy=deepspeed {stage}.zero_stage=3 (partitioned as it loads)",
            )
        )
    _trainer_time(cfg, plan, phase, t, arch, trainable, lora)


def _first_key(stage: str, t: TrainConfig, lora: bool) -> str:
    if t.strategy == "deepspeed" and t.zero_stage < 3:
        return f"{stage}.zero_stage"
    if t.strategy == "deepspeed" and not t.offload_optimizer:
        return f"{stage}.offload_optimizer"
    if stage == "tune" and not lora:
        return "tune.lora.enabled"
    return f"{stage}.micro_batch_size"


def _alternatives(arch: Architecture, stage: str, t: TrainConfig, gpus_per_node: int, usable: int, which: str) -> str:
    """The alternatives, each with the per-GPU figure it would give (``which``: the steady state or the save peak)."""
    deepspeed = t.strategy == "deepspeed"
    options: list[tuple[str, dict]] = []
    if not deepspeed or t.zero_stage < 3:
        options.append(
            (
                ("" if deepspeed else f"{stage}.strategy=deepspeed ") + f"{stage}.zero_stage=3",
                dict(strategy="deepspeed", zero_stage=3),
            )
        )
    if not deepspeed or not t.offload_optimizer:
        zero = t.zero_stage if deepspeed and t.zero_stage >= 2 else 3
        label = (
            ("" if deepspeed else f"{stage}.strategy=deepspeed ")
            + ("" if deepspeed and t.zero_stage >= 2 else f"{stage}.zero_stage={zero} ")
            + f"{stage}.offload_optimizer=true"
        )
        options.append((label, dict(strategy="deepspeed", zero_stage=zero, offload_optimizer=True)))
    if stage == "tune" and not t.lora.enabled:
        options.append(("tune.lora.enabled=true", dict(lora_r=t.lora.r)))
    if which == "steady" and not t.gradient_checkpointing:
        options.append((f"{stage}.gradient_checkpointing=true", dict(checkpointing=True)))
    if which == "steady" and t.micro_batch_size > 1:
        options.append(
            (f"{stage}.micro_batch_size={t.micro_batch_size // 2}", dict(micro_batch=t.micro_batch_size // 2))
        )
    parts = []
    for label, change in options:
        tm = _trainer_memory(arch, stage, t, gpus_per_node, **change)
        peak = max(tm.steady.total, tm.save)
        parts.append(f"{label} ({gib(peak)} GiB{' fits' if max(peak, tm.load) <= usable else ''})")
    return "alternatives: " + "; ".join(parts) if parts else "use a GPU with more memory"


def _trainer_time(
    cfg: Config, plan: Plan, phase: PhasePlan, t: TrainConfig, arch: Architecture, trainable: int, lora: bool
) -> None:
    w, stage = plan.workload, phase.name
    if stage == "align":
        samples = [w.captions]
        tokens = min(t.max_length, arch.image_tokens + timing.TEMPLATE_TOKENS + timing.CAPTION_TOKENS)
    else:
        samples = [rows / w.questions_per_image for rows in w.tune]  # one conversation per image
        turn = timing.QUESTION_TOKENS + timing.mean_reply("teacher", cfg.roles.teacher.max_new_tokens) + 8
        tokens = min(t.max_length, arch.image_tokens + timing.TEMPLATE_TOKENS + w.questions_per_image * turn)
    total = 0.0
    for n in samples:
        total += t.epochs * timing.training_seconds(
            arch,
            plan.gpu,
            stage,
            n,
            tokens,
            workers=t.num_workers,
            strategy=t.strategy,
            zero_stage=t.zero_stage,
            precision=t.precision,
            checkpointing=t.gradient_checkpointing,
            lora=lora,
            trainable=trainable,
            global_batch=t.global_batch_size,
            offload_optimizer=t.offload_optimizer,
        )
    phase.seconds = total
    phase.time_lines.append(
        f"{stage}: {sum(samples) * t.epochs:,.0f} samples x ~{tokens:.0f} tokens over "
        f"{t.num_workers} GPUs = {_hours(total)}"
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def render(plan: Plan, problems: bool = True) -> str:
    """The plan as text; ``problems=False`` leaves out the problem lines (the CLI prints them on stderr)."""
    gpu = plan.gpu
    out = []
    where = (
        f"{plan.gpus} x {gpu.name} ({gpu.describe()})" if gpu else "the CPU (no GPU named; the config asks for none)"
    )
    out.append(f"mmdc plan{' for ' + plan.config_name if plan.config_name else ''} on {where}")
    out.append("")
    out.append("Models")
    for role, arch in plan.models.items():
        out.append(
            f"  {role:<8} {arch.spec}: {_count(arch.total)} parameters (vision {_count(arch.vision)}, projector "
            f"{_count(arch.projector)}, language model {_count(arch.language)}; {arch.image_tokens} image "
            f"tokens, {arch.text.layers} layers x {arch.text.hidden}, vocab {arch.text.vocab:,}; stored as "
            f"{arch.checkpoint_dtype})"
        )
        out.append(f"  {'':<8} source: {arch.source}")
    work = plan.workload
    if work is not None:
        out.append("")
        out.append(
            f"Work: {work.instructions:,} instructions ({work.source}), {work.captions:,} stage 1 pairs; "
            f"per iteration teach {_rows(work.teach)}, tune {_rows(work.tune)}, assess {_rows(work.assess)}, "
            f"augment {_rows(work.augment)}"
            + (f"; eval {', '.join(f'{k} {v:,}' for k, v in work.eval_items.items())}" if work.eval_items else "")
        )
    for phase in plan.phases:
        out.append("")
        out.append(f"{phase.name}  (runs {phase.runs}x; {phase.gpus:g} GPU{'s' if phase.gpus != 1 else ''})")
        for dep in phase.deployments:
            out.append(f"  {dep.name}: {dep.summary}")
            if dep.memory is not None:
                where = "per GPU" if dep.gpus_each else "per process (host RAM)"
                out.append(f"    {where}: {dep.memory.describe()}")
                if dep.gpus_each and gpu is not None:
                    head = gpu.usable_bytes - dep.per_gpu
                    verdict = f"fits, {gib(head)} GiB headroom" if head >= 0 else f"DOES NOT FIT by {gib(-head)} GiB"
                    out.append(f"    peak {gib(dep.per_gpu)} GiB of {gib(gpu.usable_bytes)} usable: {verdict}")
            out += [f"    {line}" for line in dep.lines]
        if phase.host:
            out.append(f"  host RAM: {gib(phase.host)} GiB" + (" per node" if phase.gpus else ""))
        for line in phase.time_lines:
            out.append(f"  time {line}")
    out.append("")
    out += _summary(plan)
    if plan.notes:
        out.append("")
        out.append("Notes")
        out += [f"  {n}" for n in plan.notes]
    if gpu is not None:
        out.append("")
        out.append("Assumptions (mmdc/sizing/timing.py; nothing here is measured)")
        out += [f"  {a}" for a in timing.assumptions()]
    out.append("")
    if plan.problems:
        out.append(
            f"Problems ({len(plan.problems)}): the run would fail" + ("" if problems else " (one line each below)")
        )
        out += [f"  {p}" for p in plan.problems] if problems else []
    else:
        out.append(
            "No problems: every phase fits and runs" + (f" on {plan.gpus} x {gpu.name}" if gpu else " on the CPU")
        )
    return "\n".join(out)


def _rows(values: tuple[int, ...]) -> str:
    return " / ".join(f"{v:,}" for v in values) or "-"


def _summary(plan: Plan) -> list[str]:
    gpu = plan.gpu
    if gpu is None:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        rows = [("phase", "runs", "host RAM GiB")] + [(p.name, str(p.runs), gib(p.host)) for p in plan.phases]
        lines = _table(rows)
        if ram:
            lines.append(f"(this machine has {gib(ram)} GiB; wall time is not estimated on a CPU)")
        return lines
    rows = [("phase", "runs", "GPUs", "peak GiB/GPU", "usable", "headroom", "fits", "wall time", "GPU-hours")]
    total_s = total_gh = 0.0
    for p in plan.phases:
        peak = p.per_gpu
        head = gpu.usable_bytes - peak
        gh = (p.seconds or 0) * p.gpus / 3600
        total_s += p.seconds or 0
        total_gh += gh
        rows.append(
            (
                p.name,
                str(p.runs),
                f"{p.gpus:g}",
                gib(peak) if peak else "-",
                gib(gpu.usable_bytes),
                gib(head) if peak else "-",
                ("yes" if head >= 0 else "NO") if peak else "-",
                _hours(p.seconds),
                f"{gh:,.0f}" if p.seconds else "-",
            )
        )
    rows.append(("total", "", "", "", "", "", "", _hours(total_s), f"{total_gh:,.0f}"))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row: tuple[str, ...]) -> str:
        cells = (c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(row, widths)))
        return ("  " + "  ".join(cells)).rstrip()

    return [line(r) for r in rows]
