"""Attention kernels for the hf engine: SDPA by default, xformers' memory-efficient attention on GPUs.

transformers picks an attention function per model from ``attn_implementation``; it ships ``sdpa``,
``eager`` and the flash-attention kernels, but not xformers. xformers matters on the paper's
hardware: FlashAttention 2 needs Ampere or newer, and on a V100 xformers' CUTLASS kernels are the
fused attention that exists. So we register an ``xformers`` implementation with transformers'
``AttentionInterface`` (and reuse the SDPA mask builder for it, since both take the same masks).
Whether an installed xformers has kernels for a GPU is a property of its build, so it is never
assumed: ``attention: auto`` picks xformers only after a tiny test call of it on the engine's device,
in the engine's dtype, matched SDPA (``xformers_test_call``), and SDPA otherwise, logging why.

Layouts: transformers hands attention functions ``[batch, heads, seq, dim]`` tensors and expects
``[batch, seq, heads, dim]`` back; xformers takes and returns ``[batch, seq, heads, dim]``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Literal

import torch

from mmdc.engines.capability import Device, current_device, one_line, refuse

Attention = Literal["auto", "sdpa", "eager", "xformers"]
XFORMERS = "xformers"

log = logging.getLogger("mmdc.engines")


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def resolve_attention(
    requested: Attention,
    device: str,
    dtype: torch.dtype = torch.float32,
    head_dims: Iterable[int] = (8,),
    key: str = "engine",
    gpu: Device | None = None,
) -> str:
    """The ``attn_implementation`` to load a model with, on ``device`` in ``dtype``.

    ``auto``: xformers when it is installed, the model is on CUDA and a test call of its kernel at the
    model's head sizes ``head_dims`` succeeds there; else SDPA, with a log line saying why. Asking for
    xformers explicitly where it cannot run is an ``EngineRefused`` naming ``<key>.attention``, not a
    silent fallback: the user chose it. ``gpu`` names the device in messages (default: asked from torch).
    """
    if requested not in ("auto", XFORMERS):
        return requested
    if not xformers_available():
        why = 'xformers is not installed (pip install "mmdc[xformers]")'
    elif not device.startswith("cuda"):
        why = "xformers has no CPU kernels"
    else:
        why = xformers_test_call(device, dtype, head_dims)
    if why is None:
        register_xformers()
        return XFORMERS
    where = gpu or current_device(device)
    if requested == XFORMERS:
        raise refuse(f"{key}.attention", XFORMERS, where, why, "sdpa")
    (log.warning if device.startswith("cuda") and xformers_available() else log.info)(
        "%s.attention=auto: sdpa on %s, since %s", key, where.describe(), why
    )
    return "sdpa"


def xformers_test_call(device: str, dtype: torch.dtype, head_dims: Iterable[int] = (8,)) -> str | None:
    """Why xformers cannot serve attention on ``device`` in ``dtype`` (one line), or None when it can.

    Calls our adapter (``xformers_attention_forward``, so the very kernels the engine will use) on
    query/key/value of ``[1, 1, 4, head_dim]`` ``[batch, heads, seq, dim]``, once causal without a mask
    (xformers' causal bias) and once with a boolean mask (an additive bias tensor), and compares both with
    PyTorch's SDPA in float32.
    """
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    try:
        register_xformers()
        module = SimpleNamespace(is_causal=True, num_key_value_groups=1)
        causal = torch.ones(4, 4, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, q, k]
        gen = torch.Generator().manual_seed(0)
        for dim in sorted(set(head_dims)):
            q, k, v = (torch.randn(1, 1, 4, dim, generator=gen).to(device, dtype) for _ in range(3))
            want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
            for mask in (None, causal):
                out, _ = xformers_attention_forward(module, q, k, v, mask)  # [1, 4, 1, dim]
                error = (out.transpose(1, 2).float() - want).abs().max().item()
                if not error <= tolerance:  # also catches NaN
                    return f"its test call (head dim {dim}) differs from SDPA by {error:.3g}"
    except Exception as err:  # noqa: BLE001 - e.g. "No operator found for memory_efficient_attention_forward"
        return f"its test call failed: {type(err).__name__}: {one_line(str(err))}"
    return None


def register_xformers() -> None:
    """Make ``attn_implementation="xformers"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(XFORMERS, xformers_attention_forward)
    AttentionMaskInterface.register(XFORMERS, sdpa_mask)


def _additive_bias(mask: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """A boolean (True = attend) or additive mask as an additive ``[b, h, q, k]`` bias in ``dtype``.

    xformers wants the bias's rows 16-byte aligned, so it is sliced from a tensor whose last dim is
    padded to a multiple of 8 (xformers' own advice).
    """
    b, h, q, k = shape
    padded = torch.zeros((b, h, q, -(-k // 8) * 8), dtype=dtype, device=mask.device)
    bias = padded[..., :k]
    if mask.dtype == torch.bool:
        bias.masked_fill_(~mask.expand(b, h, q, k), torch.finfo(dtype).min)
    else:
        bias.copy_(mask.to(dtype).expand(b, h, q, k))
    return bias


def xformers_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over ``xformers.ops.memory_efficient_attention``."""
    from xformers import ops as xops

    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise ValueError("xformers attention supports neither softcap nor position_bias: use attention: sdpa")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: one key/value head per group of query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    b, h, q_len, _ = query.shape
    k_len = key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None:
        bias = _additive_bias(attention_mask[..., :k_len], (b, h, q_len, k_len), query.dtype)
    elif causal and q_len > 1:
        # As transformers' SDPA path: no mask + causal means keys past q_len are static-cache padding.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        bias = xops.LowerTriangularMask()
    else:
        bias = None
    out = xops.memory_efficient_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_bias=bias, p=dropout, scale=scaling
    )
    return out, None
