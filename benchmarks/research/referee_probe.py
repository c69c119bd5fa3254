"""Can the tiny world teacher learn to judge? Continue its training on referee examples and save checkpoints.

The world teacher's referee (``mmdc.world.teacher``) always replies in the paper's format but ranks a
(correct, plausible wrong) answer pair at chance (benchmarks/results/teacher_quality.md). This probe tests
two fixes without a full rebuild: it starts from a built teacher, trains on referee examples (plus a share of
teacher examples, so answering is not forgotten) and saves a checkpoint every ``--save-every`` steps, which
``benchmarks/research/teacher_quality.py --model DIR`` then measures on the held-out split.

- ``--reference``: the target reply first states the referee's own (true) answer, then the score sentence, so
  scoring becomes a comparison of two texts instead of answering "in the head" at one token position.
- ``--verdict-weight W``: an auxiliary linear head on the last hidden states of the "[End of Assistant i]"
  marker tokens is trained (BCE, weight W) to say whether answer i is correct, so the verdict is computed
  where the whole answer has been read and where the score position can find it.

    python benchmarks/research/referee_probe.py --model .mmdc_build/models/world_teacher/full-seed0 --out /tmp/probe \\
        --steps 600 --verdict-weight 1.0
    python benchmarks/research/teacher_quality.py --model /tmp/probe/step600 --test-images 40
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mmdc import roles
from mmdc.train.formatting import collate, pixel_values
from mmdc.world import scenes as world
from mmdc.world import teacher as wt


@dataclass(frozen=True)
class JudgedExample(wt.Example):
    """A referee example and whether each of its two answers is correct (for the verdict head)."""

    correct: tuple[bool, bool] = (False, False)


def referee_pair(scene: world.Scene, rng: random.Random, reference: bool) -> list[JudgedExample]:
    """``wt.referee_examples``' pair mix and scores, optionally with the true answer before the score sentence."""
    question, spec = wt.random_world_question(scene, rng)
    roll = rng.random()
    first = wt.correct_answer(scene, spec, rng) if roll < 0.75 else wt.wrong_answer(scene, spec, rng)
    second = wt.wrong_answer(scene, spec, rng) if roll < 0.5 or roll >= 0.75 else wt.correct_answer(scene, spec, rng)
    out = []
    for (a1, k1), (a2, k2) in ((first, second), (second, first)):
        target = wt.referee_target(wt.SCORES[k1], wt.SCORES[k2])
        if reference:
            target = f"{world.answer(scene, spec)}\n{target}"
        system, user = wt._request(roles.referee_messages(question, a1, a2, ""))
        out.append(
            JudgedExample(
                "referee", scene.image_id, system, user, target, (k1 in wt.CORRECT_KINDS, k2 in wt.CORRECT_KINDS)
            )
        )
    return out


def marker_positions(input_ids: list[int], assistant_ids: set[int]) -> tuple[list[int], list[int]]:
    """Token positions of "[End of Assistant 1]" and "[End of Assistant 2]" (2nd and 4th "Assistant" token)."""
    occ = [i for i, t in enumerate(input_ids) if t in assistant_ids]
    return list(range(occ[1] - 3, occ[1] + 3)), list(range(occ[3] - 3, occ[3] + 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a built world teacher")
    parser.add_argument("--out", required=True, help="checkpoints go to OUT/step<N>")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--teacher-share", type=float, default=0.2, help="share of steps on teacher examples")
    parser.add_argument("--reference", action="store_true", help="target: own answer, then the score sentence")
    parser.add_argument("--verdict-weight", type=float, default=0.0, help="weight of the auxiliary verdict loss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    processor = AutoProcessor.from_pretrained(args.model)
    tokenizer = processor.tokenizer
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    model.train()
    image_seq_length = model.config.image_seq_length
    scenes = wt.training_scenes(2000, seed=7 + args.seed)  # private scenes, not the build's, not the test split
    by_id = {s.image_id: s for s in scenes}
    assistant_ids = {tokenizer.convert_tokens_to_ids(t) for t in ("Assistant", "ĠAssistant")}
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1)
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *head.parameters()], lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    rng = random.Random(f"referee-probe:{args.seed}")
    smooth: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        if rng.random() < args.teacher_share:
            examples = [wt.teacher_example(rng.choice(scenes), rng) for _ in range(16)]
        else:
            examples = [ex for _ in range(8) for ex in referee_pair(rng.choice(scenes), rng, args.reference)]
        batch = collate(
            [wt.encode_example(tokenizer, ex, image_seq_length, 384) for ex in examples], tokenizer.pad_token_id
        )
        batch["pixel_values"] = pixel_values(
            processor.image_processor, [world.render(by_id[ex.image_id]) for ex in examples]
        )
        out = model(**batch, output_hidden_states=args.verdict_weight > 0)
        loss = out.loss
        losses = {examples[0].job: loss.item()}
        if args.verdict_weight > 0 and examples[0].job == "referee":
            rows, cols, labels = [], [], []
            for r, ex in enumerate(examples):
                for which, positions in enumerate(marker_positions(batch["input_ids"][r].tolist(), assistant_ids)):
                    rows += [r] * len(positions)
                    cols += positions
                    labels += [float(ex.correct[which])] * len(positions)
            logits = head(out.hidden_states[-1][torch.tensor(rows), torch.tensor(cols)]).squeeze(-1)
            verdict = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels))
            loss = loss + args.verdict_weight * verdict
            losses["verdict"] = verdict.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for k, v in losses.items():
            smooth[k] = v if k not in smooth else 0.9 * smooth[k] + 0.1 * v
        if step % 50 == 0:
            print(
                f"step {step} "
                + " ".join(f"{k}={v:.3f}" for k, v in smooth.items())
                + f" elapsed={time.perf_counter() - started:.0f}s",
                flush=True,
            )
        if step % args.save_every == 0 or step == args.steps:
            target = Path(args.out) / f"step{step}"
            model.save_pretrained(target)
            processor.save_pretrained(target)
            shutil.copy(Path(args.model) / wt.FINGERPRINT_FILE, target / wt.FINGERPRINT_FILE)
            (target / "probe.json").write_text(json.dumps({**vars(args), "step": step, "losses": smooth}, indent=2))


if __name__ == "__main__":
    main()
