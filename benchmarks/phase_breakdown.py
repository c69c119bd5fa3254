"""Where a teach phase's time goes: driver-side wall time against timestamps taken inside the stage tasks.

    MMDC_BUILD_DIR=.mmdc_build OMP_NUM_THREADS=1 .venv/bin/python benchmarks/phase_breakdown.py \
        [--sizes 2000,32,32,2000,2000]

For each phase (2 replicas, per-batch requests, 2 clients x 64 rows, as in engine_throughput.py):
when the processor constructors start and how long they take (imports, the Serve handle; "none" when
every task found its processor from an earlier phase in its worker process), when the first batch starts,
when the last batch ends, and the wall time of the whole ``run_processors`` call; what lies after the
last batch is output writing and the folder rename. The first phase of a Ray session also pays one-time
warm-up. This is the probe behind the "where the fixed cost went" section of results/engine_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import BATCH, SAMPLING, make_pool  # noqa: E402

from mmdc.engines.processors import TeacherProcessor  # noqa: E402


class TimedTeacher(TeacherProcessor):
    """The teach stage, appending its constructor and per-batch timestamps to a JSONL file."""

    def __init__(self, events: str, **kwargs):
        start = time.time()
        super().__init__(**kwargs)
        self.events = events
        self._log({"ev": "ctor", "start": start, "end": time.time()})

    def _log(self, record: dict) -> None:
        with open(self.events, "a") as f:
            f.write(json.dumps(record) + "\n")

    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        self._log({"ev": "batch", "start": start, "end": time.time(), "rows": len(batch)})
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,32,32,2000,2000", help="rows per phase, in order")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import ray
    from ray import serve

    from mmdc.config import EngineConfig, PipelineConfig, to_dict
    from mmdc.engines.backends import build_engine_app, deployment_name
    from mmdc.engines.processors import ProcessorSpec, run_processors
    from mmdc.world.models import models_dir
    from mmdc.world.scenes import world_corpus
    from mmdc.world.tiny import ensure_tiny_models

    model = ensure_tiny_models(models_dir(), world_corpus(), seed=0)["student"]
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    work = Path(tempfile.mkdtemp(prefix="mmdc-phase-breakdown-"))
    table, image_root = make_pool(max(sizes), work)
    engine = EngineConfig(replicas=2, num_cpus=1, max_batch_size=BATCH, request_mode="batch")
    serve.start(proxy_location="Disabled")
    serve.run(build_engine_app(engine, model), name="bench", route_prefix=None)
    events = work / "events.jsonl"
    spec = ProcessorSpec(
        TimedTeacher,
        {
            "events": str(events),
            "app_name": "bench",
            "deployment": deployment_name(model),
            "sampling": SAMPLING,
            "run_seed": 0,
            "image_root": image_root,
            "timeout_s": 600,
            "engine": to_dict(engine),
        },
        scope="bench",
    )  # as the driver: a scope per run
    print("| phase | rows | wall s | constructors start | constructor s | first batch | last batch ends | after it |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, n in enumerate(sizes):
        events.write_text("")
        cfg = PipelineConfig(batch_size=64, concurrency=2, blocks_per_client=max(1, round(n / 640)))
        start = time.time()
        run_processors(table.slice(0, n), [spec], work / f"out{k}", cfg)
        wall = time.time() - start
        ev = [json.loads(line) for line in events.read_text().splitlines()]
        ctor = [e for e in ev if e["ev"] == "ctor"]
        batches = [e for e in ev if e["ev"] == "batch"]
        last = max(e["end"] for e in batches) - start
        ctor_start = f"+{min(e['start'] for e in ctor) - start:.2f}" if ctor else "none"  # stages kept from before
        ctor_s = f"{max(e['end'] - e['start'] for e in ctor):.2f}" if ctor else "-"
        print(
            f"| {k + 1} | {n} | {wall:.2f} | {ctor_start} "
            f"| {ctor_s} | +{min(e['start'] for e in batches) - start:.2f} "
            f"| +{last:.2f} | {wall - last:.2f} |",
            flush=True,
        )
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
