"""Attention kernels for the hf engine: SDPA by default, xformers' memory-efficient attention on GPUs.

transformers picks an attention function per model from ``attn_implementation``; it ships ``sdpa``,
``eager`` and the flash-attention kernels, but not xformers. xformers matters on the paper's
hardware: FlashAttention 2 needs Ampere or newer, and on a V100 xformers' CUTLASS kernels are the
fused attention that exists. So we register an ``xformers`` implementation with transformers'
``AttentionInterface`` (and reuse the SDPA mask builder for it, since both take the same masks) and
let ``attention: auto`` choose it when xformers imports and the model runs on CUDA.

Layouts: transformers hands attention functions ``[batch, heads, seq, dim]`` tensors and expects
``[batch, seq, heads, dim]`` back; xformers takes and returns ``[batch, seq, heads, dim]``.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

Attention = Literal["auto", "sdpa", "eager", "xformers"]
XFORMERS = "xformers"


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def resolve_attention(requested: Attention, device: str) -> str:
    """The ``attn_implementation`` to load a model with.

    ``auto``: xformers on CUDA when installed (the ``gpu`` extra), else SDPA. Asking for xformers
    explicitly where it cannot run is an error, not a silent fallback: the user chose it.
    """
    if requested == "auto":
        requested = XFORMERS if device.startswith("cuda") and xformers_available() else "sdpa"
    elif requested == XFORMERS:
        if not xformers_available():
            raise RuntimeError(
                'engine attention "xformers" needs xformers: pip install "mmdc[gpu]" (or set attention: sdpa)'
            )
        if not device.startswith("cuda"):
            raise RuntimeError(
                f'engine attention "xformers" needs a CUDA device, the model is on {device!r} '
                "(set attention: sdpa or auto)"
            )
    if requested == XFORMERS:
        register_xformers()
    return requested


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
