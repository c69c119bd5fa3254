"""Teach-phase throughput: Ray Data + Serve engines against one process, replicas, and pool size.

    MMDC_BUILD_DIR=.mmdc_build OMP_NUM_THREADS=1 python benchmarks/engine_throughput.py \\
        --out benchmarks/results/engine_throughput.md

One run, one machine, one model (the tiny student: the cheapest forward pass, so pipeline overhead
shows most), the teacher prompt, temperature 0.5, 16 new tokens. Everything is reported as a ratio
to the single-process batched loop measured in the same run, because absolute rows/s on a shared
2-core machine move with whatever else runs there.

(a) rows/s of the teach stage through Ray Data + Serve, vs. HFGenerator in this process one prompt
    at a time (batch 1), and vs. the same batching (16) in this process;
(b) 1 vs. 2 engine replicas (1 CPU each) on 2 cores, and request shape: one request per Ray Data
    batch of 128, 64 or 16 rows from 2 or 4 clients, or one request per row;
(c) phase wall time as the pool grows (250 .. 2000 rows), fit as fixed + per-row cost, with Ray
    start-up and engine deployment reported apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLING = {"temperature": 0.5, "max_new_tokens": 16, "retries": 0}
BATCH = 16


@dataclass
class ServeCase:
    """One Serve configuration of the teach stage."""

    label: str
    replicas: int
    request_mode: str
    clients: int  # Ray Data client tasks in flight
    batch: int  # rows per Ray Data batch: one Serve request (per batch) or one per row
    sizes: list[int]


def make_pool(rows: int, work: Path) -> tuple[pa.Table, str]:
    """``rows`` teach rows from the synthetic world (3 questions per image)."""
    from mmdc.data.llava import load_llava_records, unfold_single_turn
    from mmdc.world.scenes import generate_world

    files = generate_world(work / "world", num_images=-(-rows // 3), questions_per_image=3, seed=0, image_size=64)
    pool, _ = unfold_single_turn(load_llava_records(str(files.instructions), strict=False).records, None)
    table = pool.sort_by("instruction_id").slice(0, rows)
    return table.select(["instruction_id", "image", "question"]), str(files.images)


def requests_for(table: pa.Table, image_root: str) -> list[dict]:
    from mmdc import roles
    from mmdc.engines.processors import image_url
    from mmdc.roles import row_seed

    return [
        {
            "messages": roles.teacher_messages(q, image_url(img, image_root)),
            "seed": row_seed(0, "teacher", i),
            "temperature": SAMPLING["temperature"],
            "max_new_tokens": SAMPLING["max_new_tokens"],
        }
        for q, img, i in zip(*(table.column(c).to_pylist() for c in ("question", "image", "instruction_id")))
    ]


def single_process(model: str, reqs: list[dict], batch: int, repeats: int = 1) -> tuple[float, int]:
    """Median wall seconds over ``repeats`` passes and generated tokens for HFGenerator in this process."""
    from mmdc.engines.hf import HFGenerator

    gen = HFGenerator(model, max_batch_size=batch)
    gen.generate(reqs[:batch])  # warm-up: first-call allocations are not per-row cost
    walls = []
    for _ in range(repeats):
        start, tokens = time.perf_counter(), 0
        for i in range(0, len(reqs), batch):
            tokens += sum(o["completion_tokens"] for o in gen.generate(reqs[i : i + batch]))
        walls.append(time.perf_counter() - start)
    return statistics.median(walls), tokens


def serve_phase(case: ServeCase, model: str, table: pa.Table, image_root: str, work: Path, repeats: int) -> dict:
    """Deploy the engine, run the teach stage ``repeats`` times at every pool size (median wall), release."""
    import ray
    from ray import serve

    from mmdc.actors.resources import wait_for
    from mmdc.config import EngineConfig, PipelineConfig, to_dict
    from mmdc.engines.backends import build_engine_app, deployment_name
    from mmdc.engines.processors import ProcessorSpec, TeacherProcessor, run_processors

    engine = EngineConfig(replicas=case.replicas, num_cpus=1, max_batch_size=BATCH, request_mode=case.request_mode)
    start = time.perf_counter()
    serve.start(proxy_location="Disabled")
    serve.run(build_engine_app(engine, model), name="bench", route_prefix=None)
    out = {"deploy_s": time.perf_counter() - start, "walls": {}, "tokens": {}}
    spec = ProcessorSpec(
        TeacherProcessor,
        {
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
    for n in case.sizes:
        # Blocks of about 5 batches: batches follow block boundaries, so many small blocks would
        # leave a short batch behind at every block end.
        blocks = max(1, round(n / (case.clients * 5 * case.batch)))
        cfg = PipelineConfig(batch_size=case.batch, concurrency=case.clients, blocks_per_client=blocks)
        walls = []
        for r in range(repeats):
            start = time.perf_counter()
            result = run_processors(table.slice(0, n), [spec], work / f"{case.label}-{n}-{r}".replace(" ", "_"), cfg)
            walls.append(time.perf_counter() - start)
            ids = result.column("instruction_id").to_pylist()
            assert sorted(ids) == sorted(table.slice(0, n).column("instruction_id").to_pylist()), (
                "rows lost or repeated"
            )
            out["tokens"][n] = sum(result.column("teacher_tokens").to_pylist())
        out.setdefault("first_phase_s", walls[0])  # new stage objects (the first case: new stage workers too)
        out["walls"][n] = statistics.median(walls)
        print(f"  {case.label}: {n} rows in {' / '.join(f'{w:.1f}' for w in walls)} s", flush=True)
    start = time.perf_counter()
    serve.delete("bench")
    total = ray.cluster_resources()
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= total["CPU"] - 1e-6, 120, "engine release")
    out["release_s"] = time.perf_counter() - start
    return out


def fit(walls: dict[int, float]) -> tuple[float, float]:
    """Least-squares wall = fixed + per_row * rows."""
    xs, ys = list(walls), list(walls.values())
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}; "
        f"load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes", default="250,500,1000,2000", help="pool sizes for (c); the largest is used for (a), (b)"
    )
    parser.add_argument("--batch1-rows", type=int, default=200, help="rows for the one-prompt-at-a-time baseline")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/engine_throughput.md"))
    parser.add_argument("--work", default="/tmp/mmdc-bench-engines")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = max(sizes)
    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from mmdc.world.models import models_dir
    from mmdc.world.scenes import world_corpus
    from mmdc.world.tiny import ensure_tiny_models

    model = ensure_tiny_models(models_dir(), world_corpus(), seed=0)["student"]
    load_at_start = machine()
    table, image_root = make_pool(rows, work)
    reqs = requests_for(table, image_root)

    print("single process ...", flush=True)
    b1_wall, _ = single_process(model, reqs[: args.batch1_rows], 1)
    b16_wall, b16_tokens = single_process(model, reqs, BATCH, args.repeats)
    single = {"b1": args.batch1_rows / b1_wall, "b16_before": rows / b16_wall}

    import ray
    from ray.data import DataContext

    start = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,  # our own cluster
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    ray_init_s = time.perf_counter() - start
    DataContext.get_current().enable_progress_bars = False
    cases = [
        ServeCase("2 replicas, per batch, 2 clients x 64 rows", 2, "batch", 2, 64, sizes),
        ServeCase("2 replicas, per batch, 2 clients x 128 rows", 2, "batch", 2, 128, [rows]),
        ServeCase("2 replicas, per batch, 2 clients x 16 rows", 2, "batch", 2, 16, [rows]),
        ServeCase("2 replicas, per batch, 4 clients x 16 rows", 2, "batch", 4, 16, [rows]),
        ServeCase("2 replicas, per row, 2 clients x 64 rows", 2, "row", 2, 64, [rows]),
        ServeCase("1 replica, per batch, 1 client x 64 rows", 1, "batch", 1, 64, [rows]),
    ]
    results = {}
    for case in cases:
        print(f"serve: {case.label} ...", flush=True)
        results[case.label] = serve_phase(case, model, table, image_root, work, args.repeats)
    ray.shutdown()
    print("single process again (the machine is shared: the baseline is the mean of before and after) ...")
    b16_wall, _ = single_process(model, reqs, BATCH, args.repeats)
    single["b16_after"] = rows / b16_wall
    single["b16"] = (single["b16_before"] + single["b16_after"]) / 2
    write_report(Path(args.out), load_at_start, sizes, single, b16_tokens, ray_init_s, cases, results, args)
    print(Path(args.out).read_text())
    return 0


def write_report(out: Path, load: str, sizes, single, tokens, ray_init_s, cases, results, args) -> None:
    rows = max(sizes)
    base = single["b16"]
    lines = [
        "# Engine throughput: the teach phase through Ray Data + Serve",
        "",
        f"Command: `MMDC_BUILD_DIR=.mmdc_build OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_throughput.py"
        f" --sizes {args.sizes} --batch1-rows {args.batch1_rows} --repeats {args.repeats}`",
        "",
        f"Machine: {load}. Ray {__import__('ray').__version__}, torch {__import__('torch').__version__}, "
        f"local cluster `ray.init(num_cpus=2)`, Serve HTTP proxy off, 1 CPU per replica, torch 1 thread.",
        "",
        f"Model: the tiny student (mmdc.world.tiny), teacher prompt, temperature {SAMPLING['temperature']}, "
        f"{SAMPLING['max_new_tokens']} new tokens ({tokens / rows:.1f} generated per row on average), "
        f"synthetic-world rows (64 px images as data URLs), batches of {BATCH}.",
        "",
        "All ratios are against the single-process batched loop measured in this same run; rows/s include the",
        "whole phase (Ray Data planning, clients starting, Parquet written) unless marked marginal. Every wall",
        f"time is the median of {args.repeats} runs (the single-process loop: {args.repeats} passes before and "
        f"{args.repeats} after the Serve runs); the first phase after each deployment (new stage objects; in the",
        "first case also the stage tasks' worker processes, which later cases reuse) is reported apart below.",
        "",
        "## (a) Serve path vs. one process, and (b) replicas and request shape",
        "",
        f"| path ({rows} rows unless noted) | rows/s | vs. one process, batch {BATCH} |",
        "|---|---:|---:|",
        f"| one process, one prompt at a time ({args.batch1_rows} rows) | {single['b1']:.1f} "
        f"| {single['b1'] / base:.2f}x |",
        f"| one process, batches of {BATCH} (mean of {single['b16_before']:.1f} before and "
        f"{single['b16_after']:.1f} after the Serve runs) | {base:.1f} | 1.00x |",
    ]
    for case in cases:
        wall = results[case.label]["walls"][rows]
        lines.append(f"| Ray Data + Serve: {case.label} | {rows / wall:.1f} | {rows / wall / base:.2f}x |")
    growth = next(c for c in cases if len(c.sizes) > 1)
    walls = results[growth.label]["walls"]
    fixed, per_row = fit(walls)
    lines += [
        f"| Ray Data + Serve: {growth.label}, marginal (slope of (c)) | {1 / per_row:.1f} "
        f"| {1 / per_row / base:.2f}x |",
        "",
        f"## (c) Phase wall time as the pool grows ({growth.label})",
        "",
        "| rows | phase wall s | s per row | marginal s per row (vs. previous size) |",
        "|---:|---:|---:|---:|",
    ]
    prev = None
    for n, w in walls.items():
        marginal = f"{(w - walls[prev]) / (n - prev) * 1000:.2f} ms" if prev else ""
        lines.append(f"| {n} | {w:.1f} | {w / n * 1000:.2f} ms | {marginal} |")
        prev = n
    lines += [
        "",
        f"Least-squares fit: phase wall = {fixed:.1f} s fixed + {per_row * 1000:.2f} ms per row.",
        "",
        "Fixed costs, reported apart from the phase (paid once per run or per deployment, not per phase):",
        "",
        "| step | s |",
        "|---|---:|",
        f"| Ray start (`ray.init`, local 2-CPU cluster) | {ray_init_s:.1f} |",
    ]
    for case in cases:
        r = results[case.label]
        lines.append(f"| Serve start + deploy ({case.label}: model load, replicas ready) | {r['deploy_s']:.1f} |")
        lines.append(
            f"| first phase after the deploy ({case.label}, {case.sizes[0]} rows: new stage objects) "
            f"| {r['first_phase_s']:.1f} (median {r['walls'][case.sizes[0]]:.1f}) |"
        )
        lines.append(f"| release ({case.label}: delete app, CPUs back) | {r['release_s']:.1f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
