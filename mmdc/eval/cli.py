"""``python -m mmdc.eval``: evaluate a checkpoint on ScienceQA, SEED-Bench (image), LLaVA-Bench or the world.

    python -m mmdc.eval --checkpoint runs/x/checkpoints/student/iter_3 --benchmark scienceqa \\
        --data scienceqa/llava_test_CQM-A.json --problems scienceqa/problems.json \\
        --pid-splits scienceqa/pid_splits.json --images scienceqa/images/test --out eval/sqa
    python -m mmdc.eval --checkpoint DIR --benchmark seed --data SEED-Bench.json --images SEED-Bench-image
    python -m mmdc.eval --checkpoint DIR --benchmark llavabench --data questions.jsonl \\
        --answers answers_gpt4.jsonl --context caps_boxes_coco2014_val_80.jsonl \\
        --judge-url http://host:8000/v1 --judge-model gpt-4o      # or --judge-checkpoint DIR
    python -m mmdc.eval --checkpoint DIR --benchmark world --data runs/x/data/world   # free-form, per family
    python -m mmdc.eval --checkpoint DIR --benchmark world_mc --data runs/x/data/world --role teacher

The model is loaded with ``mmdc.engines.hf.HFGenerator``: the very code the
Serve engine runs, so an evaluation asks exactly what the pipeline would. The
judge (LLaVA-Bench) is another local checkpoint or any OpenAI-compatible
endpoint (the paper used GPT-4). Sampling follows the paper (4.1.3): ScienceQA
T = 0.5, SEED-IMG T = 0.1, LLaVA test T = 0.7, each row with its own seed, so a
rerun reproduces every answer whatever the batch size. Writes ``results.json``,
``samples.jsonl`` and ``results.md`` into ``--out`` (see ``mmdc.eval.report``).
Images default to ``<data dir>/images`` when that folder exists, else ``<data dir>``.
The loading and scoring live in ``mmdc.eval.harness``, shared with the evaluation
the Driver runs after every iteration (``mmdc.eval.iteration``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mmdc.eval import harness, report
from mmdc.eval.harness import (  # noqa: F401 - re-exported: the CLI's public names
    JUDGE_MAX_NEW_TOKENS,
    JUDGE_TEMPERATURE,
    MAX_NEW_TOKENS,
    TABLE_DECIMALS,
    TEMPERATURE,
    Generator,
    chat_request,
    default_images_dir,
    generate_all,
    row_seed,
)
from mmdc.eval.serve import endpoint_judge

log = logging.getLogger("mmdc.eval")

BENCHMARKS = ("scienceqa", "seed", "llavabench", "world", "world_mc")


def load_task(args: argparse.Namespace) -> harness.Task:
    """The benchmark's items (limited) and how to score them, from the command line."""
    data = Path(args.data)
    if args.benchmark == "scienceqa":
        return harness.scienceqa_task(data, args.images, args.problems, args.pid_splits, args.split, args.limit)
    if args.benchmark == "seed":
        return harness.seed_task(data, args.images, args.limit)
    if args.benchmark == "world":
        return harness.world_task(data, args.limit)
    if args.benchmark == "world_mc":
        return harness.world_mc_task(data, Path(args.out) / "questions.json", args.world_seed, args.limit)
    if not args.answers:
        raise SystemExit("llavabench needs --answers (the reference answers JSONL)")
    return harness.llavabench_task(data, args.answers, args.context, args.images, args.limit)


def _open_generator(path: str, args: argparse.Namespace) -> Generator:
    from mmdc.engines.hf import HFGenerator

    return HFGenerator(
        path, dtype=args.dtype, device=args.device, max_batch_size=args.batch_size, attention=args.attention
    )


def run(args: argparse.Namespace, generator: Generator | None = None, judge: Generator | None = None) -> dict:
    """Evaluate and write the report; returns the results payload (as written to results.json)."""
    benchmark = args.benchmark
    if benchmark == "llavabench" and judge is None and not (args.judge_checkpoint or args.judge_url):
        raise SystemExit("llavabench needs a judge: --judge-checkpoint DIR or --judge-url URL --judge-model NAME")
    task = load_task(args)
    if not task.items:
        raise SystemExit(f"{args.data}: no items to evaluate")
    started = time.monotonic()
    generator = generator or _open_generator(args.checkpoint, args)
    judge_name = None
    if benchmark == "llavabench" and judge is None:
        if args.judge_url:
            judge, judge_name = (
                endpoint_judge(args.judge_url, args.judge_model, args.judge_api_key_env),
                args.judge_model,
            )
        else:
            judge, judge_name = _open_generator(args.judge_checkpoint, args), args.judge_checkpoint
    metrics, samples, meta = harness.run_task(
        task,
        generator,
        base_seed=args.seed,
        batch_size=args.batch_size,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        judge=judge,
        role=args.role,
    )
    meta = {
        "checkpoint": args.checkpoint,
        "model_name": Path(str(args.checkpoint)).name,
        **meta,
        "limit": args.limit,
        "judge": judge_name,
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    paths = report.write_results(args.out, benchmark, metrics, samples, meta, task.decimals)
    return report.read_results(paths["results"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmdc.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF LLaVA checkpoint folder of the model under test")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument(
        "--data",
        required=True,
        help="scienceqa: LLaVA's converted JSON; seed: SEED-Bench.json; llavabench: questions JSONL; "
        "world, world_mc: a generate_world folder (its held-out test split)",
    )
    p.add_argument("--images", help="image folder (default: <data dir>/images, else <data dir>)")
    p.add_argument("--limit", type=int, help="evaluate only the first N items")
    p.add_argument("--out", default=None, help="output folder (default: eval-results/<benchmark>)")
    p.add_argument("--problems", help="scienceqa: official problems.json (enables the category columns)")
    p.add_argument("--pid-splits", help="scienceqa: official pid_splits.json (keeps only --split)")
    p.add_argument("--split", default="test", help="scienceqa: split name in pid_splits.json")
    p.add_argument("--answers", help="llavabench: reference answers JSONL (question_id, text)")
    p.add_argument("--context", help="llavabench: captions/boxes JSONL for the judge")
    p.add_argument("--judge-checkpoint", help="llavabench: HF checkpoint folder of the judge")
    p.add_argument("--judge-url", help="llavabench: OpenAI-compatible base URL of the judge (e.g. http://h:8000/v1)")
    p.add_argument("--judge-model", default="gpt-4o", help="llavabench: model name sent to --judge-url")
    p.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="llavabench: environment variable that holds --judge-url's API key",
    )
    p.add_argument("--temperature", type=float, help="override the paper's temperature for this benchmark")
    p.add_argument("--max-new-tokens", type=int, help="override the answer length limit")
    p.add_argument("--seed", type=int, default=0, help="base of the per-row sampling seeds")
    p.add_argument(
        "--world-seed",
        type=int,
        default=0,
        help="world_mc: seed of the options and their order (a run uses its data.world.seed)",
    )
    p.add_argument(
        "--role",
        default="student",
        choices=("student", "teacher"),
        help="ask as the run asks this role: student = bare question, teacher = Table 6 prompt",
    )
    p.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "auto"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--attention",
        default="auto",
        choices=("auto", "sdpa", "eager", "xformers"),
        help="attention kernel (auto: xformers on CUDA when installed, else SDPA)",
    )
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.out is None:
        args.out = str(Path("eval-results") / args.benchmark)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    payload = run(args)
    sys.stdout.write(Path(args.out, report.TABLE_FILE).read_text(encoding="utf-8"))
    print(f"mmdc.eval: results in {args.out} ({len(payload['metrics'])} metrics)")
    return 0


__all__ = ["TEMPERATURE", "chat_request", "main", "parse_args", "row_seed", "run"]
