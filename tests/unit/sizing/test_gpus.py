"""Tests for mmdc/sizing/gpus.py: the catalog's compute capabilities, feature minimums, names."""

from __future__ import annotations

import pytest

from mmdc.sizing.gpus import GPUS, accelerator_matches, get_gpu


@pytest.mark.parametrize(
    "name, capability",
    [
        ("v100-32gb", 7.0),
        ("v100-16gb", 7.0),
        ("t4", 7.5),
        ("a100-40gb", 8.0),
        ("a100-80gb", 8.0),
        ("h100-80gb", 9.0),
        ("h200", 9.0),
        ("l4", 8.9),
        ("a10g", 8.6),
    ],
)
def test_compute_capabilities(name, capability):
    assert GPUS[name].capability == capability


def test_feature_minimums():
    v100, t4, a100 = get_gpu("v100-32gb"), get_gpu("t4"), get_gpu("a100-80gb")
    assert not v100.supports("bfloat16") and not v100.supports("flash_attention_2") and not v100.supports("vllm")
    assert v100.supports("sdpa") and v100.supports("xformers")
    assert t4.supports("vllm") and not t4.supports("bfloat16")
    assert a100.supports("bfloat16") and a100.supports("flash_attention_2") and a100.supports("vllm")


def test_usable_memory_is_the_total_less_the_cuda_context():
    v100 = get_gpu("v100-32gb")
    assert 31.7 < v100.memory_bytes / 2**30 < 31.8  # what nvidia-smi reports for a V100 32 GB
    assert v100.usable_bytes < v100.memory_bytes


def test_names_aliases_and_unknown():
    assert get_gpu("H100") is GPUS["h100-80gb"]
    assert get_gpu(" V100-32GB ") is GPUS["v100-32gb"]
    with pytest.raises(ValueError, match="known: v100-16gb"):
        get_gpu("k80")


def test_ray_accelerator_labels():
    assert accelerator_matches("V100", get_gpu("v100-32gb"))
    assert accelerator_matches("A100-80G", get_gpu("a100-80gb"))
    assert not accelerator_matches("A100-80G", get_gpu("a100-40gb"))
    assert not accelerator_matches("V100", get_gpu("a100-80gb"))


def test_detect_reads_the_kind_from_ray_resources():
    from mmdc.sizing.gpus import detect

    assert detect({"CPU": 8.0})[:2] == (None, 0)  # a CPU cluster (or GPU nodes not started yet)
    gpu, count, note = detect({"GPU": 8.0, "accelerator_type:A100-80G": 1.0})
    assert (gpu.name, count) == ("a100-80gb", 8) and "a100-80gb" in note
    assert detect({"GPU": 4.0, "accelerator_type:H100": 1.0})[0].name == "h100-80gb"
    # V100 is 16 or 32 GB: settled by one GPU's memory when it can be read, else planned as the smaller
    assert detect({"GPU": 6.0, "accelerator_type:V100": 1.0}, lambda: 32510)[0].name == "v100-32gb"
    gpu, _, note = detect({"GPU": 6.0, "accelerator_type:V100": 1.0}, lambda: None)
    assert gpu.name == "v100-16gb" and "--gpu v100-32gb" in note
    assert detect({"GPU": 2.0})[0] is None  # no label: --gpu
    assert detect({"GPU": 2.0, "accelerator_type:V100": 1.0, "accelerator_type:T4": 1.0})[0] is None  # mixed
    assert detect({"GPU": 2.0, "accelerator_type:MI300X": 1.0})[0] is None  # a kind the plan does not know
