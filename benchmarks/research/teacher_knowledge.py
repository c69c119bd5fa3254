"""Does the world teacher know what its referee must judge, and does the referee use it? Teacher-forced, no sampling.

``teacher_quality.py`` samples replies, so a referee that ranks pairs at chance could be a noisy judge or no
judge at all. This benchmark reads the model's probabilities instead, on the same held-out test split, for
each question paired with one plausible wrong answer (``world_teacher.wrong_answer``, garbled ones skipped:
they are told apart by their surface, not by their facts):

- **knows**: the log-likelihood of the correct answer against the wrong one under the Teacher prompt
  (Table 6); the share of pairs where the correct one is more likely. This is what the model *knows*, read
  at its output layer.
- **judges**: the referee's expected first score (the paper's reply, teacher-forced up to
  "... are"; a score's probability is that of its tokens, ``" 9"`` being two tokens here) with the correct
  answer as Assistant 1, and with the wrong one as Assistant 1; the share of pairs where the first is higher by
  at least half a point.
  A referee whose scores reflect correctness gives correct-first the higher score (it is Assistant 1's score).

With ``--runs DIR ...`` (run folders of the embedded world, e.g. ``runs/ablation/mmdc-seed*``) it also asks
the question in situ: over every scored row of the runs' assessments, how well does the referee's score for
the student's answer separate right answers from wrong ones (graded by the world's checker), against the
teacher's likelihood of that answer under the Teacher prompt? Reported as AUC: the chance that a right answer
outscores a wrong one (0.5 = no information; ties count half).

Run from the repository root (~1 min)::

    .venv/bin/python benchmarks/research/teacher_knowledge.py --model .mmdc_build/models/world_teacher/full-seed0 \
        [--runs runs/ablation/mmdc-seed0 runs/ablation/mmdc-seed1 runs/ablation/mmdc-seed2]

Prints Markdown tables (results are recorded by hand in ``benchmarks/results/teacher_quality.md``).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

sys.path[:0] = [
    str(Path(__file__).resolve().parent),
    str(Path(__file__).resolve().parents[1]),
]  # research/, benchmarks/

from teacher_quality import load_test_split  # noqa: E402

from mmdc import roles  # noqa: E402
from mmdc.train.formatting import IGNORE_INDEX, collate, pixel_values  # noqa: E402
from mmdc.world import scenes as world  # noqa: E402
from mmdc.world import teacher as wt  # noqa: E402
from mmdc.world.outputs import scored_rows  # noqa: E402

SCORE_PREFIX = "The scores for Assistant 1 and 2 are"
MARGIN = 0.5  # "judges": correct-first scores at least this much higher (half a point of the 1-10 scale)


class Scorer:
    """Teacher-forced forward passes of a built world teacher on ``world_teacher`` examples."""

    def __init__(self, model_dir: str) -> None:
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.tokenizer = self.processor.tokenizer
        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.image_seq_length = self.model.config.image_seq_length
        # Each score 1..10 as the tokens that follow "are": one token (" 3") or two (" ", "9").
        self.score_tokens = {s: self.tokenizer.encode(f" {s}", add_special_tokens=False) for s in range(1, 11)}
        self.forced = referee_target_forcing(self.score_tokens)
        self.forced_first = next(t[0] for t in self.score_tokens.values() if len(t) == 2)

    @torch.no_grad()
    def forward(self, examples: list[wt.Example], scenes: dict[str, world.Scene]):
        """(log-probabilities [batch, seq-1, vocab] of each next token, labels [batch, seq-1])."""
        encoded = [wt.encode_example(self.tokenizer, ex, self.image_seq_length, 384) for ex in examples]
        batch = collate(encoded, self.tokenizer.pad_token_id)
        batch["pixel_values"] = pixel_values(
            self.processor.image_processor, [world.render(scenes[ex.image_id]) for ex in examples]
        )
        labels = batch.pop("labels")
        logits = self.model(**batch).logits
        return torch.log_softmax(logits[:, :-1].float(), -1), labels[:, 1:]

    def answer_logprobs(self, rows: list[tuple[world.Scene, str, str]], scenes: dict) -> list[float]:
        """Sum of log-probabilities of each (scene, question, answer)'s answer tokens under the Teacher prompt."""
        examples = [wt._example("teacher", s, roles.teacher_messages(q, ""), a) for s, q, a in rows]
        logp, labels = self.forward(examples, scenes)
        mask = labels != IGNORE_INDEX
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * mask).sum(-1).tolist()

    def first_scores(self, rows: list[tuple[world.Scene, str, str, str]], scenes: dict) -> list[float]:
        """Expected first score of the referee for each (scene, question, answer 1, answer 2)."""
        examples = [
            wt._example("referee", s, roles.referee_messages(q, a1, a2, ""), self.forced) for s, q, a1, a2 in rows
        ]
        logp, labels = self.forward(examples, scenes)
        prefix = len(self.tokenizer.encode(SCORE_PREFIX, add_special_tokens=False))
        out = []
        for r in range(len(examples)):
            positions = (labels[r] != IGNORE_INDEX).nonzero().squeeze(-1).tolist()
            at = positions[prefix]  # predicts the first token of the first score
            if int(labels[r, at]) != self.forced_first:
                raise RuntimeError(f"the referee target is not tokenized as expected: {self.forced!r}")
            probs = {}
            for score, tokens in self.score_tokens.items():
                p = logp[r, at, tokens[0]]
                if len(tokens) == 2:  # " 9" = " " + "9": the forced target goes through " "
                    p = p + logp[r, at + 1, tokens[1]]
                elif len(tokens) > 2:
                    continue
                probs[score] = float(p.exp())
            mass = sum(probs.values())
            out.append(sum(s * p for s, p in probs.items()) / mass)
        return out


def referee_target_forcing(score_tokens: dict[int, list[int]]) -> str:
    """A referee target whose first score is a two-token score, so the second token's distribution is read too."""
    two = [s for s, toks in score_tokens.items() if len(toks) == 2]
    return wt.referee_target(two[-1] if two else 9, 9)


def plausible_wrong(scene: world.Scene, spec: world.QuestionSpec, rng: random.Random) -> str | None:
    """A wrong answer in the truth's style (``world_teacher.wrong_answer``, not a garbled one), or None."""
    for _ in range(20):
        wrong, kind = wt.wrong_answer(scene, spec, rng)
        if kind != "garbled":
            return wrong
    return None


def measure(model_dir: str, rows: list, seed: int) -> dict:
    scorer = Scorer(model_dir)
    scenes = {scene.image_id: scene for scene, *_ in rows}
    rng = random.Random(f"teacher-knowledge:{seed}")
    pairs = []  # (family, scene, question, correct, wrong)
    for scene, _, question, family in rows:
        spec = world.parse_question(question)
        wrong = plausible_wrong(scene, spec, rng)
        if wrong is not None:
            pairs.append((family, scene, question, world.answer(scene, spec), wrong))
    stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for start in range(0, len(pairs), 8):
        chunk = pairs[start : start + 8]
        lp = scorer.answer_logprobs([(s, q, a) for _, s, q, good, bad in chunk for a in (good, bad)], scenes)
        first = scorer.first_scores(
            [(s, q, *order) for _, s, q, good, bad in chunk for order in ((good, bad), (bad, good))], scenes
        )
        for i, (family, *_rest) in enumerate(chunk):
            for key in (family, "overall"):
                st = stats[key]
                st["n"] += 1
                st["knows"] += lp[2 * i] > lp[2 * i + 1]
                st["score_correct_first"] += first[2 * i]
                st["score_wrong_first"] += first[2 * i + 1]
                st["judges"] += first[2 * i] >= first[2 * i + 1] + MARGIN
    return stats


def auc(right: list[float], wrong: list[float]) -> float:
    """P(a right answer's value > a wrong one's), ties half: the Mann-Whitney U statistic, normalised."""
    if not right or not wrong:
        return math.nan
    ranked = sorted([(v, 1) for v in right] + [(v, 0) for v in wrong])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        rank_sum += sum(label for _, label in ranked[i:j]) * (i + j + 1) / 2
        i = j
    return (rank_sum - len(right) * (len(right) + 1) / 2) / (len(right) * len(wrong))


def separation(scorer: Scorer, run_dirs: list[Path]) -> dict[str, float]:
    """AUCs of the referee's student score and of the teacher's likelihood for the student being right."""
    values: dict[str, dict[bool, list[float]]] = {k: {True: [], False: []} for k in ("referee", "sum", "mean")}
    for run in run_dirs:
        scenes = world.load_scenes(run / "data" / "world" / "scenes.jsonl")
        for parquet in sorted((run / "assessments").glob("iter_*.parquet")):
            rows = [
                (scene, row.question, row.student_answer, float(row.score_student), right)
                for row, scene, _, right in scored_rows(pd.read_parquet(parquet), scenes)
                if isinstance(row.student_answer, str)
            ]
            for start in range(0, len(rows), 16):
                chunk = rows[start : start + 16]
                lp = scorer.answer_logprobs([(s, q, a) for s, q, a, _, _ in chunk], scenes)
                for (_, _, answer, score, right), total in zip(chunk, lp):
                    n = max(1, len(scorer.tokenizer.encode(answer, add_special_tokens=False)))
                    values["referee"][right].append(score)
                    values["sum"][right].append(total)
                    values["mean"][right].append(total / n)
    out = {k: auc(v[True], v[False]) for k, v in values.items()}
    out["right"], out["wrong"] = len(values["referee"][True]), len(values["referee"][False])
    return out


def report(stats: dict) -> str:
    lines = [
        "| family | pairs | knows: correct answer more likely | referee E[score 1], correct first | "
        f"..., wrong first | judges: higher by >= {MARGIN} with correct first |",
        "|---|---|---|---|---|---|",
    ]
    for family in (*world.FAMILIES, "overall"):
        st = stats.get(family)
        if not st:
            continue
        n = int(st["n"])
        lines.append(
            f"| {family} | {n} | {100 * st['knows'] / n:.1f}% | {st['score_correct_first'] / n:.2f} | "
            f"{st['score_wrong_first'] / n:.2f} | {100 * st['judges'] / n:.1f}% |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a built world teacher folder")
    parser.add_argument("--world-seed", type=int, default=0, help="seed of the world whose test split is used")
    parser.add_argument("--test-images", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="seed of the wrong answers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--runs",
        type=Path,
        nargs="*",
        default=[],
        help="run folders whose assessments to re-read (embedded world only)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = load_test_split(Path(tmp) / "world", args.test_images, args.world_seed)
        stats = measure(args.model, rows, args.seed)
    print(
        f"Model `{args.model}`; world seed {args.world_seed}, {args.test_images} held-out images; "
        f"{time.perf_counter() - started:.0f} s.\n"
    )
    print(report(stats))
    if args.runs:
        sep = separation(Scorer(args.model), args.runs)
        print(
            f"\nAssessments of {len(args.runs)} run(s): {sep['right']} right and {sep['wrong']} wrong student answers "
            "(world checker).\n"
        )
        print("| ranks the student's answers by | AUC, right above wrong |\n|---|---|")
        print(f"| the referee's score (as recorded in the run) | {sep['referee']:.3f} |")
        print(f"| the teacher's log-likelihood of the answer | {sep['sum']:.3f} |")
        print(f"| ... per token | {sep['mean']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
