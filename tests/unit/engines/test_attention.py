"""mmdc/engines/attention.py: which kernel an engine loads with, and that the xformers adapter gives
transformers' own SDPA results (layouts, padding masks, causal prefill, KV-cache decoding, grouped-query heads).

xformers has no CPU kernels, so the adapter runs here against a stand-in ``xformers.ops`` that does
attention by the textbook formula on xformers' ``[batch, seq, heads, dim]`` layout. The real kernel is
exercised only on a GPU (not in CI).
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from mmdc.engines import attention
from mmdc.engines.attention import register_xformers, resolve_attention


class _LowerTriangularMask:
    """xformers' causal bias: query i sees keys 0..i (top-left aligned)."""


def _reference_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    assert p == 0.0
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # -> [b, h, seq, dim]
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if isinstance(attn_bias, _LowerTriangularMask):
        n_q, n_k = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(n_q, n_k, dtype=torch.bool).tril(), float("-inf"))
    elif attn_bias is not None:
        assert attn_bias.shape == scores.shape, (attn_bias.shape, scores.shape)
        scores = scores + attn_bias.float()
    return (scores.softmax(-1) @ v).transpose(1, 2)  # -> [b, seq, h, dim]


@pytest.fixture()
def fake_xformers(monkeypatch):
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _reference_attention
    ops.LowerTriangularMask = _LowerTriangularMask
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    register_xformers()


def test_auto_is_sdpa_on_cpu_and_without_xformers(monkeypatch):
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    assert resolve_attention("auto", "cpu") == "sdpa"
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    assert resolve_attention("auto", "cuda") == "sdpa"
    assert resolve_attention("eager", "cuda:0") == "eager"


def test_auto_picks_xformers_on_cuda_when_installed(fake_xformers):
    assert resolve_attention("auto", "cuda:0") == "xformers"


def test_explicit_xformers_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    with pytest.raises(RuntimeError, match=r'pip install "mmdc\[gpu\]"'):
        resolve_attention("xformers", "cuda")
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    with pytest.raises(RuntimeError, match="needs a CUDA device.*'cpu'"):
        resolve_attention("xformers", "cpu")


def _tiny_llama(impl: str, kv_heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_xformers_adapter_matches_sdpa(fake_xformers, kv_heads):
    sdpa, xf = _tiny_llama("sdpa", kv_heads), _tiny_llama("xformers", kv_heads)
    xf.load_state_dict(sdpa.state_dict())
    assert xf.config._attn_implementation == "xformers"
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding, as batched generation has it
    with torch.no_grad():
        torch.testing.assert_close(xf(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=1e-4)  # causal path
        real = mask.bool()  # padded positions attend to nothing real: their logits are nobody's concern
        torch.testing.assert_close(
            xf(ids, attention_mask=mask).logits[real], sdpa(ids, attention_mask=mask).logits[real], atol=1e-5, rtol=1e-4
        )
        generated = {
            name: m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
            for name, m in (("sdpa", sdpa), ("xformers", xf))
        }  # decoding: one query row per step
    assert torch.equal(generated["sdpa"], generated["xformers"])


def test_xformers_bias_rows_are_aligned_for_the_kernel():
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    mask[1, ..., :2] = False
    bias = attention._additive_bias(mask, (2, 4, 3, 5), torch.float16)
    assert bias.shape == (2, 4, 3, 5) and bias.stride(-2) % 8 == 0  # 16-byte aligned rows in fp16
    assert bias[0].eq(0).all() and bias[1, ..., :2].eq(torch.finfo(torch.float16).min).all()
