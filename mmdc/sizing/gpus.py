"""The GPUs a plan can be made for: memory, compute capability, bandwidth and peak FLOPS per kind.

Memory is what ``nvidia-smi`` reports as the card's total (MiB), not the marketing figure; what a
process can use is that minus ``CUDA_CONTEXT_GIB``. Bandwidth and peak tensor FLOPS are the
datasheet's dense (no sparsity) figures of the SXM part where there are several; they feed the
wall-time estimate (``timing.py``), never a fit decision.

Which kernels need which compute capability (``MIN_CAPABILITY``): bf16 tensor cores and
FlashAttention 2 arrived with Ampere (8.0); current vLLM builds support 7.5 and up; xformers'
CUTLASS memory-efficient kernels and PyTorch's SDPA (efficient or math kernel) run on Volta (7.0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

GIB = 1024**3

# What a CUDA process loses before its first tensor: the context (kernels, cuBLAS / cuDNN handles)
# and the caching allocator's slack. Measured as 0.3-0.6 GiB for torch on V100 to H100; 0.75 is on
# the safe side.
CUDA_CONTEXT_GIB = 0.75

# Minimum compute capability per feature (NVIDIA's and the projects' own support tables).
MIN_CAPABILITY: dict[str, float] = {
    "bfloat16": 8.0,  # bf16 tensor cores: Ampere and newer
    "flash_attention_2": 8.0,  # FlashAttention 2: Ampere and newer
    "vllm": 7.5,  # current vLLM (CUDA 12.8+/13 builds) dropped Volta
    "xformers": 7.0,  # CUTLASS memory-efficient attention; wheels must include sm_70 kernels
    "sdpa": 5.0,  # PyTorch SDPA falls back to its efficient / math kernels below 8.0
    "eager": 0.0,
}


@dataclass(frozen=True)
class Gpu:
    """One GPU kind: what the plan checks against and what its time estimate assumes."""

    name: str  # catalog key, e.g. "v100-32gb"
    label: str  # what it is, for humans
    memory_mib: int  # total memory as nvidia-smi reports it
    capability: float  # CUDA compute capability, e.g. 7.0
    bandwidth_gbs: float  # memory bandwidth, GB/s (datasheet)
    tflops_16: float  # dense fp16/bf16 tensor-core peak, TFLOPS (datasheet)
    tflops_32: float  # dense fp32 peak without TF32, TFLOPS (datasheet)
    ray_accelerator: str  # Ray's accelerator_type label (engines.<name>.accelerator_type)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * 1024**2

    @property
    def usable_bytes(self) -> int:
        """What one process can allocate: the total less the CUDA context."""
        return int(self.memory_bytes - CUDA_CONTEXT_GIB * GIB)

    def supports(self, feature: str) -> bool:
        return self.capability >= MIN_CAPABILITY[feature]

    def describe(self) -> str:
        return (
            f"{self.label}, compute capability {self.capability:.1f}, {self.memory_bytes / GIB:.1f} GiB "
            f"({self.usable_bytes / GIB:.1f} usable)"
        )


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("v100-16gb", "NVIDIA V100 SXM2 16 GB", 16160, 7.0, 900, 125, 15.7, "V100"),
        Gpu("v100-32gb", "NVIDIA V100 SXM2 32 GB", 32510, 7.0, 900, 125, 15.7, "V100"),
        Gpu("t4", "NVIDIA T4 16 GB", 15360, 7.5, 320, 65, 8.1, "T4"),
        Gpu("a10g", "NVIDIA A10G 24 GB (AWS g5)", 23028, 8.6, 600, 70, 35, "A10G"),
        Gpu("l4", "NVIDIA L4 24 GB", 23034, 8.9, 300, 121, 30.3, "L4"),
        Gpu("l40s", "NVIDIA L40S 48 GB", 46068, 8.9, 864, 362, 91.6, "L40S"),
        Gpu("a100-40gb", "NVIDIA A100 SXM4 40 GB", 40960, 8.0, 1555, 312, 19.5, "A100"),
        Gpu("a100-80gb", "NVIDIA A100 SXM4 80 GB", 81920, 8.0, 2039, 312, 19.5, "A100"),
        Gpu("h100-80gb", "NVIDIA H100 SXM5 80 GB", 81559, 9.0, 3350, 989, 67, "H100"),
        Gpu("h200", "NVIDIA H200 SXM 141 GB", 143771, 9.0, 4800, 989, 67, "H200"),
    )
}
ALIASES = {"v100": "v100-32gb", "a100": "a100-80gb", "h100": "h100-80gb", "h200-141gb": "h200"}


def get_gpu(name: str) -> Gpu:
    """The catalog entry for ``name`` (case-insensitive; ``h100`` = ``h100-80gb``); ValueError naming the known ones."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def accelerator_matches(accelerator_type: str, gpu: Gpu) -> bool:
    """Whether Ray nodes of ``gpu`` carry the ``accelerator_type`` label an engine asks for.

    Ray labels nodes with the base name (``A100``) and, for some kinds, a memory variant (``A100-80G``).
    """
    base, _, variant = accelerator_type.strip().upper().partition("-")
    if base != gpu.ray_accelerator.upper():
        return False
    if not variant:
        return True
    digits = variant.rstrip("GB")
    return digits.isdigit() and abs(int(digits) - gpu.memory_mib / 1024) <= 0.1 * int(digits)


def detect(
    resources: dict[str, float], read_memory_mib: Callable[[], int | None] | None = None
) -> tuple[Gpu | None, int, str]:
    """The GPU kind of a Ray cluster from its resources: (kind or None, GPUs it has now, what was decided).

    Ray counts ``GPU`` and labels each GPU node ``accelerator_type:<label>`` (``V100``, ``A100-80G``, ...).
    A label that fits several kinds (``V100``: 16 or 32 GB) is settled by ``read_memory_mib`` (one GPU's
    total memory, read on the cluster) when given, else planned as the kind with the least memory, which
    refuses rather than lets a run run out of memory; the note says which and how to name the other.
    """
    count = int(resources.get("GPU", 0))
    if count == 0:
        return None, 0, "the cluster has no GPUs now"
    labels = sorted(key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:"))
    if len(labels) != 1:
        what = f"mixed GPU kinds ({', '.join(labels)})" if labels else "no accelerator_type label"
        return None, count, f"{count} GPUs, {what}: name the kind with --gpu"
    label = labels[0]
    candidates = sorted((g for g in GPUS.values() if accelerator_matches(label, g)), key=lambda g: g.memory_mib)
    if not candidates:
        return None, count, f"{count} GPUs labelled {label}, not a kind the plan knows: name one with --gpu"
    if len(candidates) > 1 and read_memory_mib is not None:
        mib = read_memory_mib()
        if mib:
            near = [g for g in candidates if abs(g.memory_mib - mib) <= 0.1 * g.memory_mib]
            if len(near) == 1:
                return near[0], count, f"{count} x {near[0].name} (accelerator_type:{label}, {mib:,} MiB per GPU)"
    gpu = candidates[0]
    if len(candidates) > 1:
        others = ", ".join(f"--gpu {g.name}" for g in candidates[1:])
        return gpu, count, f"{count} GPUs labelled {label}: planned as {gpu.name}, the smallest it may be ({others})"
    return gpu, count, f"{count} x {gpu.name} (accelerator_type:{label})"
