"""Sizing a run before it starts: model sizes, memory per GPU, compute-capability checks, wall time.

Everything here is arithmetic over published or local model configs (models are built on the meta
device, never loaded) and the run config; no GPU, no Ray, no network. ``check`` makes a ``Plan``;
``python -m mmdc.plan`` prints it and ``mmdc.run`` refuses a config whose plan has problems.

Floors: this package imports only ``mmdc.config`` and third-party libraries (transformers,
deepspeed, torch), so every floor above may use it.
"""

from mmdc.sizing.gpus import GPUS, Gpu, get_gpu
from mmdc.sizing.plan import Plan, Problem, check

__all__ = ["GPUS", "Gpu", "Plan", "Problem", "check", "get_gpu"]
