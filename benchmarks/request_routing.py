"""How Serve's router places whole-batch requests on hf replicas: ``max_ongoing_requests`` 4 against 1.

    MMDC_BUILD_DIR=.mmdc_build OMP_NUM_THREADS=1 .venv/bin/python benchmarks/request_routing.py \\
        --out benchmarks/results/request_routing.md

Two copies of the same engine (the tiny student, 2 replicas each) are deployed side by side, one
allowing 4 requests at a time per replica and one allowing 1, and 2,000-row teach phases alternate
between them (2 Ray Data clients, one request per batch of 64 or 128 rows), so that both see the same
machine load. Each replica records the requests it served, which shows where the time goes: with
room for several requests, two clients' routers (one per client process, each with its own view of
the replicas' queues) now and then send their batches to the same replica while the other idles.

Both copies must fit on 2 CPUs at once, so each replica asks for 0.5 CPU (torch still runs 1 thread);
the idle copy's replicas only wait.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_throughput import BATCH, SAMPLING, machine, make_pool  # noqa: E402

from mmdc.engines.hf import HFEngine  # noqa: E402


class LoggedEngine(HFEngine.func_or_class):
    """The hf engine, appending (process, start, end, rows) of every ``generate_batch`` to a JSONL file."""

    def __init__(self, log_path: str, *args):
        super().__init__(*args)
        self.log_path = log_path

    def generate_batch(self, requests: list[dict]) -> list[dict]:
        start = time.time()
        out = super().generate_batch(requests)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "start": start, "end": time.time(), "rows": len(requests)}) + "\n")
        return out


def shared_seconds(requests: list[dict]) -> float:
    """Seconds during which a replica had more than one request running: sum of durations minus their union."""
    spans = sorted((q["start"], q["end"]) for q in requests)
    union, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            union += end - max(start, reach)
            reach = end
    return sum(end - start for start, end in spans) - union


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5, help="phases per configuration, alternating")
    p.add_argument("--batches", default="64,128", help="rows per request (Ray Data batch)")
    p.add_argument("--out", default=None, help="markdown report (default: print only)")
    args = p.parse_args()

    import ray
    from ray import cloudpickle, serve
    from ray.data import DataContext

    from mmdc.config import EngineConfig, PipelineConfig, to_dict
    from mmdc.engines.backends import deployment_name
    from mmdc.engines.processors import ProcessorSpec, TeacherProcessor, run_processors
    from mmdc.world.scenes import world_corpus
    from mmdc.world.tiny import ensure_tiny_models

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas cannot import this script
    load = machine()
    from mmdc.world.models import models_dir

    model = ensure_tiny_models(models_dir(), world_corpus(), seed=0)["student"]
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="mmdc-request-routing-"))
    table, image_root = make_pool(args.rows, work)
    serve.start(proxy_location="Disabled")
    name = deployment_name(model)
    engine = EngineConfig(replicas=2, num_cpus=1, max_batch_size=BATCH, request_mode="batch")
    log_path = work / "requests.jsonl"
    specs = {}
    for ongoing in (4, 1):
        app = serve.deployment(LoggedEngine).options(
            name=name,
            num_replicas=2,
            max_ongoing_requests=ongoing,
            ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}},
        )
        serve.run(
            app.bind(str(log_path), model, "float32", BATCH, 1, engine.batch_wait_timeout_s, "auto"),
            name=f"ongoing{ongoing}",
            route_prefix=None,
        )
        specs[ongoing] = ProcessorSpec(
            TeacherProcessor,
            {
                "app_name": f"ongoing{ongoing}",
                "deployment": name,
                "sampling": SAMPLING,
                "run_seed": 0,
                "image_root": image_root,
                "timeout_s": 600,
                "engine": to_dict(engine),
            },
            scope="bench",
        )
    configs = [(ongoing, batch) for batch in (int(b) for b in args.batches.split(",")) for ongoing in (4, 1)]
    runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds + 1):  # round 0 warms the stage workers of both apps and is not reported
        for ongoing, batch in configs:
            log_path.write_text("")
            cfg = PipelineConfig(
                batch_size=batch, concurrency=2, blocks_per_client=max(1, round(args.rows / (2 * 5 * batch)))
            )
            start = time.time()
            run_processors(table, [specs[ongoing]], work / f"out-{r}-{ongoing}-{batch}", cfg)
            wall = time.time() - start
            reqs = [json.loads(line) for line in log_path.read_text().splitlines()]
            per = {}
            for q in reqs:
                per.setdefault(q["pid"], []).append(q)
            replicas = sorted(
                ([len(qs), sum(q["rows"] for q in qs), shared_seconds(qs)] for qs in per.values()), key=lambda x: -x[1]
            )
            if r:
                runs[(ongoing, batch)].append({"wall": wall, "replicas": replicas})
            print(
                f"round {r} ongoing {ongoing} batch {batch}: {wall:.2f} s, per replica (requests, rows, shared s) "
                f"{[[q, n, round(b, 2)] for q, n, b in replicas]}",
                flush=True,
            )
    serve.shutdown()
    ray.shutdown()

    lines = [
        "# Request routing: whole-batch requests on 2 hf replicas, `max_ongoing_requests` 4 vs. 1",
        "",
        f"Command: `MMDC_BUILD_DIR=.mmdc_build OMP_NUM_THREADS=1 .venv/bin/python benchmarks/request_routing.py"
        f" --rows {args.rows} --rounds {args.rounds} --batches {args.batches}`",
        "",
        f"Machine: {load}. Ray {ray.__version__}; the tiny student, teacher prompt, {SAMPLING['max_new_tokens']} "
        f"new tokens, {args.rows}-row teach phases, 2 Ray Data clients, one Serve request per batch, forward "
        f"batches of {BATCH}. Both engine copies deployed at once (2 replicas x 0.5 CPU each), phases alternating "
        "between configurations, so the comparison shares the machine's load; a warm-up round is left out.",
        "",
        "| rows per request | max_ongoing_requests | phase wall s (median) | range | rows on the busier replica "
        "(median) | phases where one replica ran two batches at once |",
        "|---:|---:|---:|---|---:|---:|",
    ]
    for ongoing, batch in configs:
        rs = runs[(ongoing, batch)]
        walls = [x["wall"] for x in rs]
        busier = statistics.median(x["replicas"][0][1] for x in rs)
        overlapped = sum(any(shared > 0 for _, _, shared in x["replicas"]) for x in rs)
        lines.append(
            f"| {batch} | {ongoing} | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} "
            f"| {busier:.0f} of {args.rows} | {overlapped} of {len(rs)} |"
        )
    lines += [
        "",
        "(Two batches at once on one replica take turns on its core while the other replica may idle; "
        "the per-phase request and row counts per replica are in the script's output.)",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
