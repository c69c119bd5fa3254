"""``python -m mmdc.eval``: evaluate a student checkpoint on ScienceQA, SEED-Bench (image) or LLaVA-Bench.

    python -m mmdc.eval --checkpoint runs/x/checkpoints/student/iter_3 --benchmark scienceqa \\
        --data scienceqa/llava_test_CQM-A.json --problems scienceqa/problems.json \\
        --pid-splits scienceqa/pid_splits.json --images scienceqa/images/test --out eval/sqa
    python -m mmdc.eval --checkpoint DIR --benchmark seed --data SEED-Bench.json --images SEED-Bench-image
    python -m mmdc.eval --checkpoint DIR --benchmark llavabench --data questions.jsonl \\
        --answers answers_gpt4.jsonl --context caps_boxes_coco2014_val_80.jsonl \\
        --judge-url http://host:8000/v1 --judge-model gpt-4o      # or --judge-checkpoint DIR

The model is loaded with ``mmdc.actors.engines.HFGenerator``: the very code the
Serve engine runs, so an evaluation asks exactly what the pipeline would. The
judge (LLaVA-Bench) is another local checkpoint or any OpenAI-compatible
endpoint (the paper used GPT-4). Sampling follows the paper (4.1.3): ScienceQA
T = 0.5, SEED-IMG T = 0.1, LLaVA test T = 0.7, each row with its own seed, so a
rerun reproduces every answer whatever the batch size. Writes ``results.json``,
``samples.jsonl`` and ``results.md`` into ``--out`` (see ``mmdc.eval.report``).
Images default to ``<data dir>/images`` when that folder exists, else ``<data dir>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol, Sequence

from mmdc.eval import llavabench, report, scienceqa, seed

log = logging.getLogger("mmdc.eval")

BENCHMARKS = ("scienceqa", "seed", "llavabench")
# Paper 4.1.3: "in the testing phase, for ScienceQA, SEED-IMG, and LLaVA Test Set, the temperatures are 0.5, 0.1, 0.7".
TEMPERATURE = {"scienceqa": 0.5, "seed": 0.1, "llavabench": 0.7}
# Multiple-choice answers are a letter; LLaVA-Bench answers are paragraphs (LLaVA allows 1024 tokens).
MAX_NEW_TOKENS = {"scienceqa": 32, "seed": 32, "llavabench": 512}
JUDGE_TEMPERATURE = 0.2  # LLaVA's GPT-4 review
JUDGE_MAX_NEW_TOKENS = 256
TABLE_DECIMALS = {"scienceqa": 2, "seed": 2, "llavabench": 1}  # as the paper's Tables 1, 2 and 3


class Generator(Protocol):
    """What the harness needs from a model: OpenAI-style chat requests in, ``{"text": ...}`` dicts out."""

    def generate(self, requests: list[dict]) -> list[dict]: ...


class OpenAIChatGenerator:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, GPT-4o, ...).

    One HTTP request per row; the key is read from ``OPENAI_API_KEY`` when set.
    """

    def __init__(self, base_url: str, model: str, timeout_s: float = 120.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s

    def generate(self, requests: list[dict]) -> list[dict]:
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        out = []
        for req in requests:
            body = {"model": self.model, "messages": req["messages"], "temperature": req.get("temperature", 0.0),
                    "max_tokens": req.get("max_new_tokens", JUDGE_MAX_NEW_TOKENS), "seed": req.get("seed")}
            http = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
            with urllib.request.urlopen(http, timeout=self.timeout_s) as resp:
                reply = json.loads(resp.read())
            out.append({"text": reply["choices"][0]["message"]["content"] or ""})
        return out


def row_seed(base_seed: int, benchmark: str, sample_id: str) -> int:
    """A per-row sampling seed: stable across runs, batchings and machines (sha1, not Python's hash)."""
    digest = hashlib.sha1(f"{base_seed}:{benchmark}:{sample_id}".encode()).hexdigest()
    return int(digest[:8], 16)


def chat_request(prompt: str, image: Path | None, temperature: float, seed_value: int, max_new_tokens: int) -> dict:
    """One student request: the image first then the text (``student_messages``), or the text alone."""
    from mmdc.actors.roles import student_messages
    from mmdc.data.images import to_data_url

    if image is not None:
        messages = student_messages(prompt, to_data_url(image))
    else:
        messages = [{"role": "user", "content": prompt}]
    return {"messages": messages, "temperature": temperature, "seed": seed_value, "max_new_tokens": max_new_tokens}


def default_images_dir(data: Path) -> Path:
    """``<data dir>/images`` if it exists, else the data file's folder."""
    candidate = data.parent / "images"
    return candidate if candidate.is_dir() else data.parent


def generate_all(generator: Generator, requests: Sequence[dict], batch_size: int, what: str) -> list[str]:
    """Texts for all requests, sent ``batch_size`` at a time (bounded memory, progress in the log)."""
    texts: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start : start + batch_size])
        texts.extend(str(r.get("text", "")) for r in generator.generate(chunk))
        log.info("%s: %d/%d", what, len(texts), len(requests))
    return texts


def _load_items(args: argparse.Namespace) -> tuple[list[Any], dict]:
    """The benchmark's items (limited) and what evaluate() needs besides them."""
    data = Path(args.data)
    extra: dict = {}
    if args.benchmark == "scienceqa":
        items = scienceqa.load(data, problems=args.problems, pid_splits=args.pid_splits, split=args.split)
    elif args.benchmark == "seed":
        items, extra["dimensions"] = seed.load(data)
    else:
        if not args.answers:
            raise SystemExit("llavabench needs --answers (the reference answers JSONL)")
        items = llavabench.load(data, args.answers, args.context)
    if args.limit is not None:
        items = items[: args.limit]
    return items, extra


def _open_generator(path: str, args: argparse.Namespace) -> Generator:
    from mmdc.actors.engines import HFGenerator

    return HFGenerator(path, dtype=args.dtype, device=args.device, max_batch_size=args.batch_size)


def run(args: argparse.Namespace, generator: Generator | None = None, judge: Generator | None = None) -> dict:
    """Evaluate and write the report; returns the results payload (as written to results.json)."""
    benchmark = args.benchmark
    data = Path(args.data)
    images_dir = Path(args.images) if args.images else default_images_dir(data)
    temperature = TEMPERATURE[benchmark] if args.temperature is None else args.temperature
    max_new = MAX_NEW_TOKENS[benchmark] if args.max_new_tokens is None else args.max_new_tokens
    if benchmark == "llavabench" and judge is None and not (args.judge_checkpoint or args.judge_url):
        raise SystemExit("llavabench needs a judge: --judge-checkpoint DIR or --judge-url URL --judge-model NAME")

    items, extra = _load_items(args)
    if not items:
        raise SystemExit(f"{data}: no items to evaluate")
    requests = [
        chat_request(item.prompt, images_dir / item.image if item.image else None, temperature,
                     row_seed(args.seed, benchmark, item.sample_id), max_new)
        for item in items
    ]
    started = time.monotonic()
    generator = generator or _open_generator(args.checkpoint, args)
    outputs = generate_all(generator, requests, args.batch_size, f"{benchmark} answers")

    judge_name = None
    if benchmark == "llavabench":
        if judge is None:
            if args.judge_url:
                judge, judge_name = OpenAIChatGenerator(args.judge_url, args.judge_model), args.judge_model
            else:
                judge, judge_name = _open_generator(args.judge_checkpoint, args), args.judge_checkpoint
        judge_requests = [
            {"messages": llavabench.judge_messages(item, answer), "temperature": JUDGE_TEMPERATURE,
             "seed": row_seed(args.seed, "llavabench-judge", item.sample_id), "max_new_tokens": JUDGE_MAX_NEW_TOKENS}
            for item, answer in zip(items, outputs)
        ]
        replies = generate_all(judge, judge_requests, args.batch_size, "judge replies")
        metrics, samples = llavabench.evaluate(items, outputs, replies)
    elif benchmark == "seed":
        metrics, samples = seed.evaluate(items, outputs, extra["dimensions"])
    else:
        metrics, samples = scienceqa.evaluate(items, outputs)
    for sample, request in zip(samples, requests):
        sample["seed"] = request["seed"]

    meta = {"checkpoint": args.checkpoint, "model_name": Path(str(args.checkpoint)).name, "data": str(data),
            "images": str(images_dir), "limit": args.limit, "temperature": temperature, "max_new_tokens": max_new,
            "seed": args.seed, "judge": judge_name, "elapsed_s": round(time.monotonic() - started, 2)}
    paths = report.write_results(args.out, benchmark, metrics, samples, meta, TABLE_DECIMALS[benchmark])
    return report.read_results(paths["results"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmdc.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF LLaVA checkpoint folder of the model under test")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--data", required=True,
                   help="scienceqa: LLaVA's converted JSON; seed: SEED-Bench.json; llavabench: questions JSONL")
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
    p.add_argument("--temperature", type=float, help="override the paper's temperature for this benchmark")
    p.add_argument("--max-new-tokens", type=int, help="override the answer length limit")
    p.add_argument("--seed", type=int, default=0, help="base of the per-row sampling seeds")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generate call")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "auto"))
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
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


__all__ = ["OpenAIChatGenerator", "TEMPERATURE", "chat_request", "main", "parse_args", "row_seed", "run"]
