"""mmdc/engines/capability.py: which backend and dtype a device runs, the one-line refusal, and finding that line
again in what Serve reports; the hf and vLLM replicas' checks on a faked GPU (``torch.cuda`` or a node label).

No GPU here: a GPU is a ``Device``, or ``torch.cuda``'s answers replaced by the test's.
"""

from __future__ import annotations

import logging

import pytest
import torch

from mmdc.config import EngineConfig
from mmdc.engines import capability, vllm
from mmdc.engines.capability import (
    MIN_CAPABILITY,
    Device,
    EngineRefused,
    accelerator_device,
    check_engine,
    dtype_test_call,
    refusal_in,
)

V100 = Device("Tesla V100-SXM2-32GB", (7, 0))
T4 = Device("Tesla T4", (7, 5))
A100 = Device("NVIDIA A100-SXM4-80GB", (8, 0))
CPU = Device("CPU")


def test_sizing_mirrors_the_rules_and_knows_the_same_gpus():
    """mmdc.sizing (mmdc.plan) keeps its own copy, since engines and sizing are peers that do not import each other."""
    from mmdc.sizing.gpus import GPUS
    from mmdc.sizing.gpus import MIN_CAPABILITY as SIZING_MIN

    assert {k: float(f"{a}.{b}") for k, (a, b) in MIN_CAPABILITY.items()} == {k: SIZING_MIN[k] for k in MIN_CAPABILITY}
    for gpu in GPUS.values():
        device = accelerator_device(gpu.ray_accelerator)
        assert device is not None and float("{}.{}".format(*device.capability)) == gpu.capability, gpu.name


def test_vllm_below_its_minimum_capability_is_refused_naming_gpu_key_and_alternative():
    with pytest.raises(EngineRefused) as refused:
        check_engine("engines.teacher", "vllm", "float16", V100)
    assert str(refused.value) == (
        "engines.teacher.backend=vllm cannot run on GPU Tesla V100-SXM2-32GB (compute capability 7.0): vLLM needs "
        "compute capability >= 7.5; set engines.teacher.backend=hf (with dtype float16 and attention sdpa)"
    )
    check_engine("engines.teacher", "vllm", "float16", T4)
    check_engine("engines.teacher", "vllm", "bfloat16", A100)
    with pytest.raises(EngineRefused, match=r"^engines.teacher.backend=vllm cannot run on the CPU: .*backend=hf$"):
        check_engine("engines.teacher", "vllm", "float16", CPU)


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_bf16_below_8_0_is_refused_with_float16_as_the_alternative(backend):
    with pytest.raises(EngineRefused) as refused:
        check_engine("engines.student", backend, "bfloat16", T4)
    assert str(refused.value) == (
        "engines.student.dtype=bfloat16 cannot run on GPU Tesla T4 (compute capability 7.5): bf16 needs compute "
        "capability >= 8.0; set engines.student.dtype=float16"
    )
    check_engine("engines.student", backend, "float16", T4)
    check_engine("engines.student", backend, "bfloat16", A100)


def test_half_precision_on_the_cpu_is_tried_and_refused_only_where_it_fails(monkeypatch):
    for dtype in ("float16", "bfloat16"):
        assert dtype_test_call(dtype) is None  # this torch build runs both on the CPU
        check_engine("engines.student", "hf", dtype, CPU)

    def no_half(*args, **kwargs):
        raise RuntimeError("\"slow_conv2d_cpu\" not implemented for 'Half'\nmore detail")

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_half)
    with pytest.raises(EngineRefused) as refused:
        check_engine("engines.student", "hf", "float16", CPU)
    assert str(refused.value) == (
        "engines.student.dtype=float16 cannot run on the CPU: a test forward pass in float16 failed: RuntimeError: "
        "\"slow_conv2d_cpu\" not implemented for 'Half'; set engines.student.dtype=float32"
    )
    check_engine("engines.student", "hf", "float32", CPU)  # never tried


def test_ray_accelerator_labels_name_their_capability():
    assert accelerator_device("V100") == Device("V100", (7, 0))
    assert accelerator_device("A100-80G") == Device("A100-80G", (8, 0))
    assert accelerator_device("h100").capability == (9, 0)
    assert accelerator_device("RTX-PRO-6000") is None  # not in the table: not judged


SERVE_FAILURE = (
    "Deploying application student failed: Failed to update the deployments ['hf-student'].\n"
    "The deployment failed to start 3 times in a row. This may be due to a problem with its constructor or initial "
    "health check failing. See controller logs for details. Error:\n"
    "ray::ServeReplica:student:hf-student.initialize_and_get_metadata() (pid=4242, ip=10.0.0.2)\n"
    '  File "/work/main/mmdc/engines/capability.py", line 140, in check_engine\n'
    "    raise refuse(\n"
    "mmdc.engines.capability.EngineRefused: engines.student.dtype=bfloat16 cannot run on GPU Tesla V100-SXM2-32GB "
    "(compute capability 7.0): bf16 needs compute capability >= 8.0; set engines.student.dtype=float16\n"
)


def test_the_refusal_line_is_found_again_in_what_serve_reports():
    line = (
        "engines.student.dtype=bfloat16 cannot run on GPU Tesla V100-SXM2-32GB (compute capability 7.0): bf16 "
        "needs compute capability >= 8.0; set engines.student.dtype=float16"
    )
    assert refusal_in(RuntimeError(SERVE_FAILURE)) == line
    assert refusal_in(EngineRefused(line)) == line
    wrapped = RuntimeError("the driver failed")
    wrapped.__cause__ = RuntimeError(SERVE_FAILURE.replace("EngineRefused:", "RayTaskError(EngineRefused):"))
    assert refusal_in(wrapped) == line
    assert refusal_in(RuntimeError("Deploying application student failed: out of memory")) is None


def _fake_cuda(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)


def test_an_hf_replica_refuses_bf16_on_a_v100_before_it_loads_the_model(monkeypatch, tiny_student):
    from mmdc.engines.hf import HFGenerator

    _fake_cuda(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    monkeypatch.setattr("transformers.AutoProcessor.from_pretrained", pytest.fail)  # nothing loads after a refusal
    with pytest.raises(EngineRefused) as refused:
        HFGenerator(tiny_student, dtype="bfloat16", engine_key="engines.student")
    assert str(refused.value) == (
        "engines.student.dtype=bfloat16 cannot run on GPU Tesla V100-SXM2-32GB (compute capability 7.0): bf16 "
        "needs compute capability >= 8.0; set engines.student.dtype=float16"
    )


def test_an_hf_replica_refuses_an_explicit_xformers_whose_test_call_fails(monkeypatch, tiny_student):
    from mmdc.engines import attention
    from mmdc.engines.hf import HFGenerator

    _fake_cuda(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    monkeypatch.setattr(attention, "xformers_available", lambda: True)
    seen = []

    def fails(device, dtype, head_dims):
        seen.append((device, dtype))
        return "its test call failed: NotImplementedError: No operator found"

    monkeypatch.setattr(attention, "xformers_test_call", fails)
    monkeypatch.setattr("transformers.LlavaForConditionalGeneration.from_pretrained", pytest.fail)
    with pytest.raises(EngineRefused, match=r"^engines.student.attention=xformers cannot run on GPU Tesla V100-SXM2"):
        HFGenerator(tiny_student, dtype="float16", attention="xformers", engine_key="engines.student")
    assert seen == [("cuda", torch.float16)]


def test_a_vllm_replica_checks_its_nodes_gpu(monkeypatch, caplog):
    monkeypatch.setattr(vllm, "node_device", lambda: accelerator_device("V100"))
    with pytest.raises(EngineRefused, match=r"^engines.teacher.backend=vllm cannot run on GPU V100 \(compute "):
        vllm.check_vllm_replica("engines.teacher", "bfloat16")
    monkeypatch.setattr(vllm, "node_device", lambda: accelerator_device("A100"))
    vllm.check_vllm_replica("engines.teacher", "bfloat16")
    monkeypatch.setattr(vllm, "node_device", lambda: None)
    with caplog.at_level(logging.INFO, logger="mmdc.engines"):
        vllm.check_vllm_replica("engines.teacher", "bfloat16")
    assert "GPU kind is unknown" in caplog.text


def test_node_device_reads_rays_accelerator_label(monkeypatch):
    import ray

    class Context:
        def __init__(self, labels):
            self.labels = labels

        def get_node_labels(self):
            return self.labels

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context({"ray.io/accelerator-type": "V100"}))
    assert capability.node_device() == Device("V100", (7, 0))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context({}))
    assert capability.node_device() is None


def test_a_vllm_engine_on_a_known_gpu_kind_is_refused_before_anything_is_deployed():
    from mmdc.engines.backends import build_engine_app

    engine = EngineConfig(backend="vllm", num_gpus=1, dtype="float16", accelerator_type="V100")
    with pytest.raises(EngineRefused) as refused:  # before the vLLM import: this works where vLLM is not installed
        build_engine_app(engine, "llava-hf/llava-1.5-13b-hf", engine_name="teacher")
    assert str(refused.value) == (
        "engines.teacher.backend=vllm cannot run on GPU V100 (compute capability 7.0): vLLM needs compute "
        "capability >= 7.5; set engines.teacher.backend=hf (with dtype float16 and attention sdpa)"
    )
    engine = EngineConfig(backend="vllm", num_gpus=1, dtype="bfloat16", accelerator_type="T4")
    with pytest.raises(EngineRefused, match=r"^engines.teacher.dtype=bfloat16 cannot run on GPU T4 "):
        build_engine_app(engine, "llava-hf/llava-1.5-13b-hf", engine_name="teacher")
