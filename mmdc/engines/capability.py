"""What an engine's device can run, and the one-line refusal when it cannot.

An engine checks its own device when its replica starts, before it loads a model: the hf replica
its CUDA device (or the CPU), the vLLM replica the GPU kind of the node it was placed on (Ray's
``ray.io/accelerator-type`` node label; the replica itself holds no GPU). Where the GPU kind is
known before anything is deployed (``engines.<name>.accelerator_type``), ``build_vllm_app`` checks
it statically too. A refusal is an ``EngineRefused`` whose message is one line naming the config
key, the device (name and compute capability) and what to set instead:

    engines.teacher.backend=vllm cannot run on GPU V100 (compute capability 7.0): vLLM needs compute
    capability >= 7.5; set engines.teacher.backend=hf (with dtype float16 and attention sdpa)

Serve reports a replica that failed in ``__init__`` as a failed deployment whose message holds the
replica's traceback; ``refusal_in`` finds the line there again.

``MIN_CAPABILITY`` is the rule table. ``mmdc.sizing.gpus.MIN_CAPABILITY`` mirrors it for
``mmdc.plan`` (sizing and engines are peers and do not import each other);
tests/unit/engines/test_capability.py keeps the two equal.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

log = logging.getLogger("mmdc.engines")

# Minimum CUDA compute capability (major, minor) per feature.
MIN_CAPABILITY: dict[str, tuple[int, int]] = {
    "vllm": (7, 5),  # vLLM 0.29 (ray[llm] 2.60) builds for CUDA 13, which dropped Volta
    "bfloat16": (8, 0),  # bf16 tensor cores: Ampere and newer
}

# Compute capability per Ray accelerator label (ray.util.accelerators; what `accelerator_type` and the
# node label `ray.io/accelerator-type` say). A label not here is not judged.
ACCELERATOR_CAPABILITY: dict[str, tuple[int, int]] = {
    "K80": (3, 7),
    "P100": (6, 0),
    "P4": (6, 1),
    "V100": (7, 0),
    "T4": (7, 5),
    "A100": (8, 0),
    "A10G": (8, 6),
    "A10": (8, 6),
    "A40": (8, 6),
    "L4": (8, 9),
    "L40S": (8, 9),
    "H100": (9, 0),
    "H200": (9, 0),
    "H20": (9, 0),
    "B200": (10, 0),
    "GB200": (10, 0),
}
NODE_ACCELERATOR_LABEL = "ray.io/accelerator-type"


class EngineRefused(RuntimeError):
    """An engine config its device cannot run; the message is one line: key, device, reason, alternative."""


@dataclass(frozen=True)
class Device:
    """The device an engine runs on: a GPU with its compute capability, or the CPU (capability None)."""

    name: str  # "Tesla V100-SXM2-32GB", a Ray label such as "V100", or "CPU"
    capability: tuple[int, int] | None = None  # (major, minor); None on the CPU

    @property
    def is_gpu(self) -> bool:
        return self.capability is not None

    def describe(self) -> str:
        if not self.is_gpu:
            return "the CPU"
        return f"GPU {self.name} (compute capability {self.capability[0]}.{self.capability[1]})"


def current_device(device: str) -> Device:
    """The device a torch device string (``cpu``, ``cuda``, ``cuda:1``) names, read from torch."""
    if not device.startswith("cuda"):
        return Device("CPU")
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return Device(torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index)))


def accelerator_device(accelerator_type: str) -> Device | None:
    """The GPU a Ray accelerator label names (``V100``, ``A100-80G``), or None for a label not in the table."""
    label = accelerator_type.strip().upper()
    capability = ACCELERATOR_CAPABILITY.get(label) or ACCELERATOR_CAPABILITY.get(label.split("-")[0])
    return Device(accelerator_type.strip(), capability) if capability else None


def node_device() -> Device | None:
    """The GPU kind of the node this Ray worker runs on (its ``ray.io/accelerator-type`` label), None if unknown.

    For a process that holds no GPU itself but drives GPUs of its node (the vLLM replica), read without
    initialising CUDA.
    """
    import ray

    label = ray.get_runtime_context().get_node_labels().get(NODE_ACCELERATOR_LABEL)
    if isinstance(label, (list, tuple)):
        label = label[0] if label else None
    return accelerator_device(label) if label else None


def replica_engine_key() -> str:
    """``engines.<app name>`` inside a Serve replica (the driver names each app after its engine), else ``engine``."""
    try:
        from ray import serve

        return f"engines.{serve.get_replica_context().app_name}"
    except Exception:  # noqa: BLE001 - not in a replica (a local HFGenerator, a test)
        return "engine"


def refuse(key: str, value: str, device: Device, why: str, instead: str) -> EngineRefused:
    """The one-line refusal: ``<key>=<value> cannot run on <device>: <why>; set <key>=<instead>``."""
    return EngineRefused(f"{key}={value} cannot run on {device.describe()}: {one_line(why)}; set {key}={instead}")


def check_engine(key: str, backend: str, dtype: str, device: Device) -> None:
    """Raise ``EngineRefused`` when ``backend`` in ``dtype`` cannot run on ``device``; ``key`` is ``engines.<name>``.

    A GPU is judged by ``MIN_CAPABILITY``; on the CPU, fp16 and bf16 are tried with a tiny forward pass
    (``dtype_test_call``), since whether they run there depends on the torch build.
    """
    if backend == "vllm":
        if not device.is_gpu:
            raise refuse(f"{key}.backend", "vllm", device, "vLLM serves on GPUs only", "hf")
        if device.capability < MIN_CAPABILITY["vllm"]:
            raise refuse(
                f"{key}.backend",
                "vllm",
                device,
                f"vLLM needs compute capability >= {_dotted(MIN_CAPABILITY['vllm'])}",
                "hf (with dtype float16 and attention sdpa)",
            )
    if dtype == "bfloat16" and device.is_gpu and device.capability < MIN_CAPABILITY["bfloat16"]:
        raise refuse(
            f"{key}.dtype",
            "bfloat16",
            device,
            f"bf16 needs compute capability >= {_dotted(MIN_CAPABILITY['bfloat16'])}",
            "float16",
        )
    if dtype in ("float16", "bfloat16") and not device.is_gpu:
        why = dtype_test_call(dtype)
        if why:
            raise refuse(f"{key}.dtype", dtype, device, why, "float32")


def dtype_test_call(dtype: str, device: str = "cpu") -> str | None:
    """Why ``dtype`` does not run on ``device`` (one line), or None after a tiny forward pass in it succeeded.

    The pass touches what a LLaVA forward needs: a patch convolution, linear layers, layer norm, GELU,
    softmax and SDPA, on ``[1, 4, 1, 8]`` query/key/value tensors ``[batch, heads, seq, dim]``.
    """
    import torch
    import torch.nn.functional as F

    try:
        t = getattr(torch, dtype)
        image = torch.randn(1, 3, 4, 4).to(device, t)  # [batch, channels, height, width]
        patches = F.conv2d(image, torch.randn(8, 3, 2, 2).to(device, t)).flatten(2).transpose(1, 2)  # [1, 4, 8]
        hidden = F.gelu(F.layer_norm(F.linear(patches, torch.randn(8, 8).to(device, t)), (8,)))
        qkv = hidden.unsqueeze(1)  # [1, 1, 4, 8]
        out = F.scaled_dot_product_attention(qkv, qkv, qkv, is_causal=True).softmax(-1)
        if not torch.isfinite(out.float()).all():
            return f"a test forward pass in {dtype} gave non-finite values"
    except Exception as err:  # noqa: BLE001 - whatever the build lacks, say it in one line
        return f"a test forward pass in {dtype} failed: {type(err).__name__}: {one_line(str(err))}"
    return None


def refusal_in(err: BaseException) -> str | None:
    """The ``EngineRefused`` line inside a failure that carries it (Serve's failed-deployment message, a
    ``RayTaskError``), or None. For the caller of ``serve.run`` that wants to show the user that line alone."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EngineRefused) and "\n" not in str(current):
            return str(current)
        match = re.search(r"EngineRefused\)?: (.+)", str(current))
        if match:
            return match.group(1).strip()
        current = getattr(current, "cause", None) or current.__cause__
    return None


def one_line(text: str, limit: int = 300) -> str:
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _dotted(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"
