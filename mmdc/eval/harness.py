"""One way to run any benchmark: load it into a ``Task``, ask a ``Generator``, score the replies.

Why one harness: ``python -m mmdc.eval`` (a checkpoint, by hand) and the Driver
(the deployed engine, after every iteration) must compute a score the same way,
or the report and a manual check would drift apart (STYLE.md: no parallel entry
points). Both build a ``Task`` with one of the ``*_task`` functions and call
``run_task``; only where the model lives differs (``HFGenerator`` in process,
``mmdc.eval.serve.ServeGenerator`` over Ray Serve).

Sampling is reproducible per sample: every request carries
``row_seed(base, benchmark, sample_id)`` and the engines sample each row from its
own seed, so a rerun, another batch size or another engine replica gives the
same answers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from mmdc.eval import llavabench, scienceqa, seed

log = logging.getLogger("mmdc.eval")

# Paper 4.1.3: "in the testing phase, for ScienceQA, SEED-IMG, and LLaVA Test Set, the temperatures are 0.5, 0.1, 0.7".
# The world has no paper value: its free-form and multiple-choice questions use ScienceQA's 0.5, the temperature
# the run's roles sample at in the embedded default, so the student is measured the way it answers in the loop.
TEMPERATURE = {"scienceqa": 0.5, "seed": 0.1, "llavabench": 0.7, "world": 0.5, "world_mc": 0.5}
# Multiple-choice answers are a letter and world answers one short sentence; LLaVA-Bench answers are paragraphs.
MAX_NEW_TOKENS = {"scienceqa": 32, "seed": 32, "llavabench": 512, "world": 32, "world_mc": 32}
TABLE_DECIMALS = {"scienceqa": 2, "seed": 2, "llavabench": 1, "world": 2, "world_mc": 2}  # as the paper's Tables 1-3
HEADLINE = {"llavabench": llavabench.OVERALL}  # the one-number column of a benchmark (Tables 4/5); default "Avg"
JUDGE_TEMPERATURE = 0.2  # LLaVA's GPT-4 review
JUDGE_MAX_NEW_TOKENS = 256

Role = Literal["student", "teacher"]


class Generator(Protocol):
    """What the harness needs from a model: OpenAI-style chat requests in, ``{"text": ...}`` dicts out."""

    def generate(self, requests: list[dict]) -> list[dict]: ...


@dataclass
class Task:
    """One benchmark, loaded: items that each have ``sample_id``, ``prompt`` and ``image``, and how to score replies.

    ``score(outputs, judge_replies)`` returns (metrics, per-sample records);
    ``judge_requests(outputs, base_seed)`` is set only for judged benchmarks (LLaVA-Bench).
    """

    benchmark: str
    items: list[Any]
    images_dir: Path | None
    score: Callable[[list[str], list[str] | None], tuple[dict, list[dict]]]
    judge_requests: Callable[[list[str], int], list[dict]] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def decimals(self) -> int:
        return TABLE_DECIMALS.get(self.benchmark, 2)


def headline(benchmark: str) -> str:
    """The column that stands for a benchmark in one-number tables (the paper's Tables 4 and 5)."""
    return HEADLINE.get(benchmark, "Avg")


def row_seed(base_seed: int, benchmark: str, sample_id: str) -> int:
    """A per-row sampling seed: stable across runs, batchings and machines (sha1, not Python's hash)."""
    digest = hashlib.sha1(f"{base_seed}:{benchmark}:{sample_id}".encode()).hexdigest()
    return int(digest[:8], 16)


def _text_only(messages: list[dict]) -> list[dict]:
    """The same messages without their image parts (a text-only ScienceQA question)."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            texts = [p["text"] for p in content if p.get("type") == "text"]
            content = "\n".join(texts)
        out.append({"role": message["role"], "content": content})
    return out


def chat_request(
    prompt: str, image: Path | None, temperature: float, seed_value: int, max_new_tokens: int, role: Role = "student"
) -> dict:
    """One request as the run asks it: the student's bare question, or the teacher's Table 6 prompt.

    The image goes first, as a data URL (what every engine backend accepts, on any node);
    a text-only item sends the same messages without the image part.
    """
    from mmdc.data.images import to_data_url
    from mmdc.roles import student_messages, teacher_messages

    build = teacher_messages if role == "teacher" else student_messages
    if image is not None:
        messages = build(prompt, to_data_url(image))
    else:
        messages = _text_only(build(prompt, "text-only"))
    return {"messages": messages, "temperature": temperature, "seed": seed_value, "max_new_tokens": max_new_tokens}


def generate_all(generator: Generator, requests: Sequence[dict], batch_size: int, what: str) -> list[str]:
    """Texts for all requests, sent ``batch_size`` at a time (bounded memory, progress in the log)."""
    texts: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = list(requests[start : start + batch_size])
        texts.extend(str(r.get("text", "")) for r in generator.generate(chunk))
        log.info("%s: %d/%d", what, len(texts), len(requests))
    return texts


def default_images_dir(data: Path) -> Path:
    """``<data dir>/images`` if it exists, else the data file's folder."""
    candidate = data.parent / "images"
    return candidate if candidate.is_dir() else data.parent


def _limited(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


# ----------------------------------------------------------------------------- tasks


def scienceqa_task(
    data: str | Path,
    images: str | Path | None = None,
    problems: str | Path | None = None,
    pid_splits: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    name: str = "scienceqa",
    extra_columns: Callable[[list[dict]], dict] | None = None,
) -> Task:
    """ScienceQA in LLaVA's converted format (also the world's multiple-choice rendering, ``name="world_mc"``).

    ``extra_columns(samples)`` adds columns after Table 1's (the world's per-family accuracy).
    """
    data = Path(data)
    items = _limited(scienceqa.load(data, problems=problems, pid_splits=pid_splits, split=split), limit)

    def score(outputs: list[str], _judge: list[str] | None) -> tuple[dict, list[dict]]:
        metrics, samples = scienceqa.evaluate(items, outputs)
        if extra_columns is not None:
            counts = {k: metrics.pop(k) for k in ("n", "correct", "failed")}
            metrics.update(extra_columns(samples))
            metrics.update(counts)
        return metrics, samples

    return Task(name, items, Path(images) if images else default_images_dir(data), score, meta={"data": str(data)})


def seed_task(data: str | Path, images: str | Path | None = None, limit: int | None = None) -> Task:
    """SEED-Bench, image questions only, accuracy per dimension."""
    data = Path(data)
    loaded, dimensions = seed.load(data)
    items = _limited(loaded, limit)
    return Task(
        "seed",
        items,
        Path(images) if images else default_images_dir(data),
        lambda outputs, _judge: seed.evaluate(items, outputs, dimensions),
        meta={"data": str(data)},
    )


def llavabench_task(
    data: str | Path,
    answers: str | Path,
    context: str | Path | None = None,
    images: str | Path | None = None,
    limit: int | None = None,
) -> Task:
    """LLaVA-Bench: the model answers, a judge scores (reference, model) pairs."""
    data = Path(data)
    items = _limited(llavabench.load(data, answers, context), limit)

    def judge_requests(outputs: list[str], base_seed: int) -> list[dict]:
        return [
            {
                "messages": llavabench.judge_messages(item, answer),
                "temperature": JUDGE_TEMPERATURE,
                "seed": row_seed(base_seed, "llavabench-judge", item.sample_id),
                "max_new_tokens": JUDGE_MAX_NEW_TOKENS,
            }
            for item, answer in zip(items, outputs)
        ]

    def score(outputs: list[str], replies: list[str] | None) -> tuple[dict, list[dict]]:
        if replies is None:
            raise ValueError("llavabench needs judge replies")
        return llavabench.evaluate(items, outputs, replies)

    return Task(
        "llavabench",
        items,
        Path(images) if images else default_images_dir(data),
        score,
        judge_requests=judge_requests,
        meta={"data": str(data)},
    )


def world_task(world_dir: str | Path, limit: int | None = None) -> Task:
    """The world's test split, free-form, graded by the world's checker (``mmdc.world.grading``)."""
    from mmdc.world import grading as world_eval

    items, scenes = world_eval.load_items(world_dir)
    items = _limited(items, limit)
    return Task(
        world_eval.FREE_FORM,
        items,
        Path(world_dir) / "images",
        lambda outputs, _judge: world_eval.evaluate(items, scenes, outputs),
        meta={"data": str(world_dir)},
    )


def world_mc_task(world_dir: str | Path, questions_file: str | Path, seed_value: int, limit: int | None = None) -> Task:
    """The world's test split as multiple choice: written in ScienceQA's format, scored by the ScienceQA harness.

    ``questions_file`` keeps the rendered questions, so ``python -m mmdc.eval
    --benchmark scienceqa --data <it> --images <world>/images`` reproduces the score by hand.
    """
    from mmdc.world import grading as world_eval

    path = world_eval.write_multiple_choice(world_dir, questions_file, seed_value)
    family = {item.sample_id: item.family for item in world_eval.load_items(world_dir)[0]}

    def per_family(samples: list[dict]) -> dict:
        for sample in samples:  # the family goes into samples.jsonl too
            sample["family"] = family[sample["id"]]
        return {k: v for k, v in world_eval.family_metrics(samples).items() if k != world_eval.OVERALL}

    return scienceqa_task(
        path, images=Path(world_dir) / "images", limit=limit, name=world_eval.MULTIPLE_CHOICE, extra_columns=per_family
    )


# ----------------------------------------------------------------------------- running


def run_task(
    task: Task,
    generator: Generator,
    *,
    base_seed: int = 0,
    batch_size: int = 16,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
    judge: Generator | None = None,
    role: Role = "student",
) -> tuple[dict, list[dict], dict]:
    """Ask every item, score the replies: (metrics, per-sample records, meta for the results file)."""
    if not task.items:
        raise ValueError(f"{task.benchmark}: no items to evaluate")
    temp = TEMPERATURE[task.benchmark] if temperature is None else temperature
    max_new = MAX_NEW_TOKENS[task.benchmark] if max_new_tokens is None else max_new_tokens
    requests = [
        chat_request(
            item.prompt,
            task.images_dir / item.image if item.image else None,
            temp,
            row_seed(base_seed, task.benchmark, item.sample_id),
            max_new,
            role,
        )
        for item in task.items
    ]
    outputs = generate_all(generator, requests, batch_size, f"{task.benchmark} answers")
    replies = None
    if task.judge_requests is not None:
        if judge is None:
            raise ValueError(f"{task.benchmark} needs a judge generator")
        replies = generate_all(judge, task.judge_requests(outputs, base_seed), batch_size, "judge replies")
    metrics, samples = task.score(outputs, replies)
    for sample, request in zip(samples, requests):
        sample["seed"] = request["seed"]
    meta = {
        **task.meta,
        "images": str(task.images_dir) if task.images_dir else None,
        "role": role,
        "temperature": temp,
        "max_new_tokens": max_new,
        "seed": base_seed,
        "n_items": len(task.items),
    }
    return metrics, samples, meta


__all__ = [
    "Generator",
    "HEADLINE",
    "MAX_NEW_TOKENS",
    "TEMPERATURE",
    "Task",
    "chat_request",
    "generate_all",
    "headline",
    "llavabench_task",
    "row_seed",
    "run_task",
    "scienceqa_task",
    "seed_task",
    "world_mc_task",
    "world_task",
]
