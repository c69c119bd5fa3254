"""Deploy wall time: ``serve.run``'s own wait (it looks at the app once a second) against ``deploy_app``'s (every
0.1 s), for the default run's two engines.

    OMP_NUM_THREADS=1 python benchmarks/deploy_wait.py --rounds 10 --out benchmarks/results/deploy_wait.md

One local 2-CPU Ray cluster; the engines and models of ``configs/tiny.yaml`` (the world teacher and the tiny
student, built once into the usual cache). Each round deploys each engine once per method, in alternating
order, and releases it before the next deploy as the driver does; the report gives medians and the paired
difference per round, so the machine's noise hits both methods alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def serve_run(app, name: str) -> None:
    """The old way: ``serve.run`` waits for RUNNING, looking once a second."""
    from ray import serve

    serve.run(app, name=name, route_prefix=None)


def timed_deploy(method, engine, model: str, name: str) -> float:
    from ray import serve

    from mmdc.actors.handover import release_engines
    from mmdc.engines.backends import build_engine_app

    start = time.perf_counter()
    serve.start(proxy_location="Disabled")
    method(build_engine_app(engine, model, engine_name=name), name)
    wall = time.perf_counter() - start
    release_engines({name: engine})
    return wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy_wait.md"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    from mmdc.config import load_config
    from mmdc.engines.backends import deploy_app
    from mmdc.world import models

    cfg = load_config(args.config)
    teacher = models.resolve(cfg.models.teacher, cfg.models)
    student = models.resolve(cfg.models.student_init, cfg.models, teacher=teacher)
    load = os.getloadavg()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    methods = {"serve.run (1 s look)": serve_run, "deploy_app (0.1 s look)": deploy_app}
    walls: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for engine_name, model in (("teacher", teacher), ("student", student)):
            order = list(methods.items()) if r % 2 == 0 else list(reversed(methods.items()))
            for label, method in order:
                wall = timed_deploy(method, cfg.engines[engine_name], model, engine_name)
                walls.setdefault((engine_name, label), []).append(wall)
                print(f"round {r} {engine_name} {label}: {wall:.2f} s", flush=True)
    ray.shutdown()

    old, new = list(methods)
    lines = [
        "# Deploy wall time: Serve's 1 s status look against a 0.1 s one",
        "",
        f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deploy_wait.py --rounds {args.rounds}`",
        "",
        f"Machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}; load average at"
        f" start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}. Local cluster `ray.init(num_cpus=2)`; engines and"
        f" models of `configs/tiny.yaml` (teacher `{cfg.models.teacher}`, student `{cfg.models.student_init}`). A"
        " deploy is timed from `serve.start` to RUNNING; every deploy is followed by a release (untimed), as in a run."
        f" {args.rounds} rounds, the two methods in alternating order.",
        "",
        f"| engine | {old} median s | {new} median s | ratio new / old | paired difference, median s |",
        "|---|---:|---:|---:|---:|",
    ]
    for engine_name in ("teacher", "student"):
        a, b = walls[(engine_name, old)], walls[(engine_name, new)]
        diff = statistics.median(y - x for x, y in zip(a, b))
        ma, mb = statistics.median(a), statistics.median(b)
        lines.append(f"| {engine_name} | {ma:.2f} | {mb:.2f} | {mb / ma:.2f}x | {diff:+.2f} |")
    lines += ["", "Every deploy, in seconds:", ""]
    for (engine_name, label), values in walls.items():
        lines.append(f"- {engine_name}, {label}: " + ", ".join(f"{v:.2f}" for v in values))
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
