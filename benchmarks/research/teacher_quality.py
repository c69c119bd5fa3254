"""How good is the world teacher at its three jobs, on held-out images, through the served inference path?

The world teacher (``mmdc.world.teacher``) is trained on a private
world; this benchmark asks it about the world's held-out *test* split
(``world.generate_world(..., test_images=N)``, a random stream the training
world never draws from), through ``mmdc.engines.hf.HFGenerator`` with the
Table 6 requests of ``mmdc.roles`` and images as data URLs: exactly
what the Serve engine does in a run. Measured:

- teacher: accuracy per question family (``world.grade``);
- referee (``--referee-scoring``, default configs/tiny.yaml's): how often the reply parses
  (``roles.parse_referee``); for (correct, wrong) answer pairs, how often the correct one scores higher, per
  order and after averaging both orders (what the assessment does); and the
  Eq. 6 split that follows (tau = 0.33): a wrong student answer should be
  hard, a correct one easy;
- augmentor: how often the reply is a usable new question: non-empty, one
  sentence, no answer, same family (``world.parse_question``), only shapes in
  the image, ROUGE-L < 0.7 against the given question;
- latency: one batch of 16 referee requests on one thread (the engine's
  setting in the embedded default).

Run from the repository root::

    .venv/bin/python benchmarks/research/teacher_quality.py --schedule short            # builds (cached) then measures
    .venv/bin/python benchmarks/research/teacher_quality.py --model /path/to/teacher     # measure an existing build

Writes ``benchmarks/results/teacher_quality.md`` (``--no-write`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from mmdc import roles
from mmdc.config import load_config
from mmdc.data.augment import contains_answer, is_one_sentence, rouge_l_f, tokenize
from mmdc.data.calibration import likelihood_reply, likelihood_score
from mmdc.data.images import to_data_url
from mmdc.engines.hf import HFGenerator
from mmdc.world import scenes as world
from mmdc.world import teacher as wt

TAU = 0.33
# Per-role sampling exactly as the embedded default runs it (configs/tiny.yaml roles.*).
_TINY = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
_ROLES = _TINY.roles
SAMPLING = {
    role: {"temperature": getattr(_ROLES, role).temperature, "max_new_tokens": getattr(_ROLES, role).max_new_tokens}
    for role in ("teacher", "referee", "augmentor")
}


def load_test_split(root: Path, test_images: int, seed: int) -> list[tuple[world.Scene, str, str, str]]:
    """(scene, image path, question, family) for every question of the held-out test split."""
    files = world.generate_world(root, num_images=0, questions_per_image=3, seed=seed, test_images=test_images)
    scenes = world.load_scenes(files.scenes)
    rows = []
    for record in json.loads(files.test.read_text()):
        scene = scenes[record["id"]]
        for turn in record["conversations"]:
            if turn["from"] == "human":
                question = turn["value"].replace("<image>", "").strip()
                rows.append((scene, str(files.images / record["image"]), question, turn["family"]))
    return rows


def _ask(gen: HFGenerator, role: str, messages: list[list[dict]], seed: int, batch: int = 16) -> list[str]:
    out = []
    started = time.perf_counter()
    for start in range(0, len(messages), batch):
        reqs = [
            {"messages": m, **SAMPLING[role], "seed": seed + start + i}
            for i, m in enumerate(messages[start : start + batch])
        ]
        out.extend(r["text"] for r in gen.generate(reqs))
    print(f"  {len(messages)} requests in {time.perf_counter() - started:.0f}s", flush=True)
    return out


def names_only_present_shapes(scene: world.Scene, spec: world.QuestionSpec) -> bool:
    """A generated question may ask about any colour/shape pair (exist), but must not presuppose an absent shape."""
    if spec.family == "exist":
        return True
    present = {o.shape for o in scene.objects}
    return all(shape in present for shape in (spec.shape, spec.other) if shape is not None)


def eq6(score_student: float, score_teacher: float) -> float:
    """Paper Eq. 6."""
    return (abs(score_student - score_teacher) + 1) / max(score_student, score_teacher)


def _likelihood_replies(gen: HFGenerator, requests: list[dict], batch: int = 16) -> list[str]:
    """Score requests for (good, other) answer pairs -> the two replies per pair (good first, good second)."""
    started = time.perf_counter()
    outs = [o for start in range(0, len(requests), batch) for o in gen.generate(requests[start : start + batch])]
    print(f"  {len(requests)} score requests in {time.perf_counter() - started:.0f}s", flush=True)
    scores = [likelihood_score(o["logprob"], o["scored_tokens"]) for o in outs]
    return [
        reply
        for good, other in zip(scores[0::2], scores[1::2])
        for reply in (likelihood_reply(good, other), likelihood_reply(other, good))
    ]


def measure(model_dir: str, rows: list, seed: int, referee_scoring: str = "reply") -> dict:
    """Run all three jobs on ``rows`` and return the numbers (the referee as ``calibration.referee_scoring``)."""
    gen = HFGenerator(model_dir, max_batch_size=16)
    urls = {path: to_data_url(path) for _, path, _, _ in rows}
    results: dict = {}

    # Teacher.
    replies = _ask(gen, "teacher", [roles.teacher_messages(q, urls[p]) for _, p, q, _ in rows], seed)
    per_family: dict[str, list[bool]] = defaultdict(list)
    for (scene, _, q, family), reply in zip(rows, replies):
        per_family[family].append(bool(world.grade(scene, q, reply)))
    results["teacher"] = {
        f: (sum(v), len(v)) for f, v in sorted(per_family.items(), key=lambda kv: world.FAMILIES.index(kv[0]))
    }
    results["teacher_examples"] = [(q, r) for (_, _, q, _), r in list(zip(rows, replies))[:6]]

    # Referee: (truth, wrong) and (truth, short truth) pairs, each asked in both orders.
    rng = random.Random(f"teacher-quality-referee:{seed}")
    pairs = []  # (kind, row, good, other, other_is_correct)
    for row in rows:
        scene, _, q, _ = row
        spec = world.parse_question(q)
        wrong, kind = wt.wrong_answer(scene, spec, rng)
        pairs.append((kind, row, world.answer(scene, spec), wrong, False))
        short = wt.short_answer(scene, spec) or world.answer(scene, spec)
        pairs.append(("both_correct", row, world.answer(scene, spec), short, True))
    if referee_scoring == "likelihood":  # the teacher prompt, each answer scored; replies as the stage writes them
        msgs = [
            {"messages": roles.teacher_messages(q, urls[p]), "score_reply": answer}
            for _, (_, p, q, _), good, other, _ in pairs
            for answer in (good, other)
        ]
        replies = _likelihood_replies(gen, msgs)
    else:
        msgs = []
        for _, (_, p, q, _), good, other, _ in pairs:
            msgs.append(roles.referee_messages(q, good, other, urls[p]))  # good first
            msgs.append(roles.referee_messages(q, other, good, urls[p]))  # good second
        replies = _ask(gen, "referee", msgs, seed + 100_000)
    parsed = []
    for reply in replies:
        try:
            parsed.append(roles.parse_referee(reply))
        except roles.RefereeParseError:
            parsed.append(None)
    ref = defaultdict(lambda: defaultdict(int))
    for i, (kind, *_rest, other_correct) in enumerate(pairs):
        first, second = parsed[2 * i], parsed[2 * i + 1]
        group = "both_correct" if other_correct else "correct_vs_wrong"
        stats = ref[group]
        stats["pairs"] += 1
        stats["parsed_replies"] += (first is not None) + (second is not None)
        if not other_correct:
            ref[f"wrong:{kind}"]["pairs"] += 1
        if first is not None:
            stats["good_first_higher"] += first[0] > first[1]
            stats["good_first_n"] += 1
        if second is not None:
            stats["good_second_higher"] += second[1] > second[0]
            stats["good_second_n"] += 1
        if first is not None and second is not None:
            good_score = (first[0] + second[1]) / 2  # the teacher's answer
            other_score = (first[1] + second[0]) / 2  # the "student's" answer
            stats["both_parsed"] += 1
            stats["mean_higher"] += good_score > other_score
            stats["hard"] += eq6(other_score, good_score) >= TAU
            if not other_correct:
                ref[f"wrong:{kind}"]["both_parsed"] += 1
                ref[f"wrong:{kind}"]["hard"] += eq6(other_score, good_score) >= TAU
                ref[f"wrong:{kind}"]["mean_higher"] += good_score > other_score
    results["referee"] = {k: dict(v) for k, v in ref.items()}
    results["referee_replies"] = len(replies)
    results["referee_parsed"] = sum(p is not None for p in parsed)
    results["referee_examples"] = replies[:4]

    # Augmentor.
    replies = _ask(gen, "augmentor", [roles.augmentor_messages(q, urls[p]) for _, p, q, _ in rows], seed + 200_000)
    aug = defaultdict(int)
    for (scene, _, q, family), reply in zip(rows, replies):
        new = roles.parse_augmentor(reply)
        spec = world.parse_question(new) if new else None
        checks = {
            "non_empty": bool(new.strip()),
            "one_sentence": is_one_sentence(new),
            "no_answer": not contains_answer(new),
            "same_family": spec is not None and spec.family == family,
            "valid_for_scene": spec is not None and names_only_present_shapes(scene, spec),
            "rouge_l_below_0.7": bool(new.strip()) and rouge_l_f(tokenize(q), tokenize(new)) < 0.7,
        }
        for name, ok in checks.items():
            aug[name] += ok
        aug["all_valid"] += all(checks.values())
        aug["n"] += 1
    results["augmentor"] = dict(aug)
    results["augmentor_examples"] = [(q, r) for (_, _, q, _), r in list(zip(rows, replies))[:6]]

    # Latency: 16 referee requests, one thread, as the engine runs in the embedded default.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batch = (
        msgs[:16]
        if referee_scoring == "likelihood"
        else [{"messages": m, **SAMPLING["referee"], "seed": i} for i, m in enumerate(msgs[:16])]
    )
    gen.generate(batch)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        gen.generate(batch)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    results["referee_batch16_s"] = min(times)
    return results


def _pct(num: float, den: float) -> str:
    return f"{100 * num / den:.2f}% ({num}/{den})" if den else "n/a"


def report(results: dict, args: argparse.Namespace, model_dir: str, build: dict | None, wall_s: float) -> str:
    built = build or {}
    lines = [
        "# World teacher quality (held-out test split, served inference path)",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Machine: {platform.machine()}, nproc={os.cpu_count()}, torch {torch.__version__}, "
        "CPU only; the machine was shared with other jobs, so wall times are upper bounds.",
        f"Model: `{model_dir}`; schedule `{built.get('schedule_name', '?')}`, seed {built.get('seed', '?')}, "
        f"builder version {built.get('builder_version', '?')}, build time {built.get('build_seconds', '?')} s; "
        f"stage 1 (vision first) {built.get('stage1') or 'none'}; "
        f"final training losses {built.get('final_losses', '?')}.",
        f"Test split: world seed {args.world_seed}, {args.test_images} held-out images, "
        f"{results['n_questions']} questions; "
        f"sampling per role (configs/tiny.yaml): {SAMPLING}. "
        f"Measurement took {wall_s:.0f} s.",
        "",
        "## Teacher accuracy per family (world.grade)",
        "",
        "| family | accuracy |",
        "|---|---|",
    ]
    total = [0, 0]
    for family, (ok, n) in results["teacher"].items():
        lines.append(f"| {family} | {_pct(ok, n)} |")
        total[0] += ok
        total[1] += n
    lines += [
        f"| **overall** | {_pct(*total)} |",
        "",
        "## Referee",
        "",
        f"Scoring (calibration.referee_scoring): `{args.referee_scoring}`.",
        "",
    ]
    lines.append(
        f"Replies that parse (roles.parse_referee): {_pct(results['referee_parsed'], results['referee_replies'])}"
    )
    lines += [
        "",
        "| pairs | n | correct scored higher, correct first | correct scored higher, correct second "
        "| mean of both orders higher | Eq. 6 hard (tau 0.33) |",
        "|---|---|---|---|---|---|",
    ]
    for group, s in sorted(results["referee"].items()):
        if group.startswith("wrong:"):
            lines.append(
                f"| ... wrong answer kind `{group[6:]}` | {s.get('pairs', 0)} | | | "
                f"{_pct(s.get('mean_higher', 0), s.get('both_parsed', 0))} | "
                f"{_pct(s.get('hard', 0), s.get('both_parsed', 0))} |"
            )
            continue
        first = _pct(s.get("good_first_higher", 0), s.get("good_first_n", 0))
        second = _pct(s.get("good_second_higher", 0), s.get("good_second_n", 0))
        mean = _pct(s.get("mean_higher", 0), s.get("both_parsed", 0))
        lines.append(
            f"| {group} | {s['pairs']} | {first} | {second} | {mean} | "
            f"{_pct(s.get('hard', 0), s.get('both_parsed', 0))} |"
        )
    lines += [
        "",
        "For `correct_vs_wrong` a high hard rate is right (the wrong answer makes the instruction hard); "
        "for `both_correct` (canonical vs short correct answer) a low one is right, and 'higher' there is not a goal.",
        "",
        f"Latency: one batch of 16 referee requests on 1 thread: {results['referee_batch16_s']:.2f} s.",
        "",
        "## Augmentor",
        "",
    ]
    aug = results["augmentor"]
    lines += ["| check | rate |", "|---|---|"]
    for name in (
        "non_empty",
        "one_sentence",
        "no_answer",
        "same_family",
        "valid_for_scene",
        "rouge_l_below_0.7",
        "all_valid",
    ):
        lines.append(f"| {name} | {_pct(aug.get(name, 0), aug['n'])} |")
    lines += ["", "## Sample replies", ""]
    for q, r in results["teacher_examples"]:
        lines.append(f"- teacher: {q!r} -> {r!r}")
    for r in results["referee_examples"]:
        lines.append(f"- referee: {r!r}")
    for q, r in results["augmentor_examples"]:
        lines.append(f"- augmentor: {q!r} -> {r!r}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="world teacher quality on held-out images")
    parser.add_argument("--model", help="an existing world teacher folder (default: build/reuse one in --cache)")
    parser.add_argument("--schedule", default="short", choices=sorted(wt.SCHEDULES))
    parser.add_argument("--seed", type=int, default=0, help="world teacher build seed")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "mmdc-teacher-quality"))
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world whose test split is used")
    parser.add_argument("--test-images", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/teacher_quality.md")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--referee-max-new-tokens",
        type=int,
        default=None,
        help="override configs/tiny.yaml's referee cap (a referee that reasons before scoring)",
    )
    parser.add_argument(
        "--referee-scoring",
        choices=("reply", "likelihood"),
        default=_TINY.calibration.referee_scoring,
        help="how the referee scores (calibration.referee_scoring; default: configs/tiny.yaml's)",
    )
    args = parser.parse_args()
    if args.referee_max_new_tokens is not None:
        SAMPLING["referee"]["max_new_tokens"] = args.referee_max_new_tokens

    torch.set_num_threads(2)
    model_dir = args.model or wt.ensure_world_teacher(
        args.cache, schedule=args.schedule, seed=args.seed, log=lambda m: print(m, flush=True)
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_test_split(Path(tmp) / "world", args.test_images, args.world_seed)
        results = measure(model_dir, rows, seed=1234, referee_scoring=args.referee_scoring)
    results["n_questions"] = len(rows)
    text = report(results, args, model_dir, wt.read_fingerprint(model_dir), time.perf_counter() - start)
    print(text)
    if not args.no_write:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
