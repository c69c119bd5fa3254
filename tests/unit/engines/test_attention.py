"""mmdc/engines/attention.py: which kernel an engine loads with (xformers only after its test call succeeds),
the one-line refusal of an explicit xformers that cannot run, and that the xformers adapter gives transformers'
own SDPA results (layouts, padding masks, causal prefill, KV-cache decoding, grouped-query heads).

xformers has no CPU kernels, so the adapter and its test call run here against a stand-in ``xformers.ops``
that does attention by the textbook formula on xformers' ``[batch, seq, heads, dim]`` layout; a GPU is named
by a ``Device``, not asked from torch. The real kernel is exercised only on a GPU (not in CI).
"""

from __future__ import annotations

import logging
import math
import sys
import types

import pytest
import torch

from mmdc.engines import attention
from mmdc.engines.attention import register_xformers, resolve_attention, xformers_test_call
from mmdc.engines.capability import Device, EngineRefused

V100 = Device("Tesla V100-SXM2-32GB", (7, 0))


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


def test_auto_is_sdpa_on_cpu_and_without_xformers(monkeypatch, caplog):
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="mmdc.engines"):
        assert resolve_attention("auto", "cpu", key="engines.student") == "sdpa"
    assert "engines.student.attention=auto: sdpa on the CPU, since xformers has no CPU kernels" in caplog.text
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    assert resolve_attention("auto", "cuda", gpu=V100) == "sdpa"
    assert resolve_attention("eager", "cuda:0") == "eager"
    assert resolve_attention("sdpa", "cuda:0") == "sdpa"


def test_auto_picks_xformers_only_after_its_test_call_succeeds(fake_xformers, monkeypatch, caplog):
    calls = []

    def test_call(device, dtype, head_dims):
        calls.append((device, dtype, sorted(head_dims)))
        return None

    monkeypatch.setattr(attention, "xformers_test_call", test_call)
    assert resolve_attention("auto", "cuda:0", torch.float16, (128, 64), gpu=V100) == "xformers"
    assert calls == [("cuda:0", torch.float16, [64, 128])]  # on the engine's device, in its dtype, at its head sizes

    monkeypatch.setattr(
        attention, "xformers_test_call", lambda *a: "its test call failed: NotImplementedError: No operator found"
    )
    with caplog.at_level(logging.INFO, logger="mmdc.engines"):
        assert resolve_attention("auto", "cuda:0", torch.float16, key="engines.student", gpu=V100) == "sdpa"
    assert (
        "engines.student.attention=auto: sdpa on GPU Tesla V100-SXM2-32GB (compute capability 7.0), since its test "
        "call failed: NotImplementedError: No operator found"
    ) in caplog.text


def test_explicit_xformers_that_cannot_run_is_a_one_line_refusal(fake_xformers, monkeypatch):
    monkeypatch.setattr(
        attention, "xformers_test_call", lambda *a: "its test call failed: NotImplementedError: No operator found"
    )
    with pytest.raises(EngineRefused) as refused:
        resolve_attention("xformers", "cuda", torch.float16, key="engines.student", gpu=V100)
    assert str(refused.value) == (
        "engines.student.attention=xformers cannot run on GPU Tesla V100-SXM2-32GB (compute capability 7.0): its "
        "test call failed: NotImplementedError: No operator found; set engines.student.attention=sdpa"
    )
    with pytest.raises(EngineRefused, match=r"^engines.student.attention=xformers cannot run on the CPU: xformers "):
        resolve_attention("xformers", "cpu", key="engines.student")
    monkeypatch.setattr(attention, "xformers_available", lambda: False)
    with pytest.raises(EngineRefused, match=r'xformers is not installed \(pip install "mmdc\[xformers\]"\); set '):
        resolve_attention("xformers", "cuda", gpu=V100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_test_call_passes_a_kernel_that_matches_sdpa(fake_xformers, dtype):
    assert xformers_test_call("cpu", dtype, (8, 64)) is None


def test_the_test_call_names_a_kernel_that_fails_or_is_wrong(fake_xformers, monkeypatch):
    ops = sys.modules["xformers.ops"]

    def no_kernel(*args, **kwargs):
        raise NotImplementedError(
            "No operator found for `memory_efficient_attention_forward` with inputs:\n     query : shape=(1, 4, 1, 8)"
        )

    monkeypatch.setattr(ops, "memory_efficient_attention", no_kernel)
    why = xformers_test_call("cpu", torch.float16)
    assert why == (
        "its test call failed: NotImplementedError: No operator found for `memory_efficient_attention_forward` "
        "with inputs:"
    )
    monkeypatch.setattr(ops, "memory_efficient_attention", lambda q, k, v, **kw: torch.zeros_like(q))
    assert xformers_test_call("cpu", torch.float16).startswith("its test call (head dim 8) differs from SDPA by ")
    monkeypatch.setattr(ops, "memory_efficient_attention", lambda q, k, v, **kw: torch.full_like(q, float("nan")))
    assert "differs from SDPA by nan" in xformers_test_call("cpu", torch.float32)


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
