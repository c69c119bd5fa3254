"""Can the tiny world teacher learn to *verify* (answer yes/no about a claim), given time? A training probe.

The world teacher retrieves well (the colour of the square: its likelihood ranks the correct colour first
96% of the time) but verifies at chance (exist questions, "Is there a red circle?"), and the referee's job is
verification: is "The square is blue." true of this image? This probe continues training a built teacher on
teacher examples of one question family only, at a fixed learning rate, and every ``--eval-every`` steps
measures on held-out private scenes how often the correct answer is more likely than a plausible wrong one
(``teacher_knowledge.Scorer``). A family the model can learn climbs; one stuck on a plateau stays at chance.

    .venv/bin/python benchmarks/research/verification_probe.py --model .mmdc_build/models/world_teacher/full-seed0 \\
        --family exist --steps 2000 --lr 1.5e-3
    .venv/bin/python benchmarks/research/verification_probe.py --model ... --family color --steps 300   # a control

``--chain`` (exist only) tests why: the target first states what the image shows about the shape asked for,
then the verdict ("The circle is blue, so no." / "There is no circle, so no."), so each hop (find the shape,
read its colour, compare) has its own supervised tokens, as a colour answer ("The square is red.") has.
Progress is then measured by what a run would see: greedy replies through ``HFGenerator`` (the engine's code),
graded by ``world.check_answer`` (the first yes/no word decides), for both modes.

    .venv/bin/python benchmarks/research/verification_probe.py --model ... --family exist --steps 1000 --generate
    .venv/bin/python benchmarks/research/verification_probe.py --model ... --family exist --steps 1000 --chain

Prints one line per evaluation; nothing is kept.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_knowledge import Scorer, plausible_wrong  # noqa: E402

from mmdc import roles  # noqa: E402
from mmdc.train.formatting import collate, pixel_values  # noqa: E402
from mmdc.world import scenes as world  # noqa: E402
from mmdc.world import teacher as wt  # noqa: E402


def chain_answer(scene: world.Scene, spec: world.QuestionSpec) -> str:
    """An exist answer that states the evidence before the verdict: "The circle is blue, so no."."""
    obj = scene.find(spec.shape)
    if obj is None:
        return f"There is no {spec.shape}, so no."
    return f"The {spec.shape} is {obj.color}, so {'yes' if obj.color == spec.color else 'no'}."


def family_examples(
    scenes: list[world.Scene], family: str, n: int, rng: random.Random, chain: bool = False
) -> list[wt.Example]:
    """``n`` teacher examples of ``family`` on random scenes that can ask it (``chain``: evidence-first targets)."""
    usable = [s for s in scenes if family in world.families_for(s)]
    out = []
    for _ in range(n):
        scene = rng.choice(usable)
        question, spec = world.random_question(scene, family, rng)
        target = chain_answer(scene, spec) if chain else world.answer(scene, spec)
        out.append(wt._example("teacher", scene, roles.teacher_messages(question, ""), target))
    return out


def generated_accuracy(
    scorer: Scorer, pairs: list[tuple[world.Scene, str, str, str]], folder: Path
) -> tuple[float, str]:
    """Share of greedy replies (the engine's generator on a saved copy) that ``world.check_answer`` accepts,
    and ``chain_hops`` of them."""
    from mmdc.data.images import to_data_url
    from mmdc.engines.hf import HFGenerator

    scorer.model.save_pretrained(folder / "model")
    scorer.processor.save_pretrained(folder / "model")
    urls = []
    for scene, *_ in pairs:
        path = folder / f"{scene.image_id}.png"
        if not path.exists():
            world.render(scene).save(path)
        urls.append(to_data_url(str(path)))
    generator = HFGenerator(str(folder / "model"), max_batch_size=16)
    requests = [
        {"messages": roles.teacher_messages(q, url), "temperature": 0.0, "max_new_tokens": 16, "seed": 0}
        for (_, q, _, _), url in zip(pairs, urls)
    ]
    replies = [r["text"] for r in generator.generate(requests)]
    right = sum(
        bool(world.check_answer(s, world.parse_question(q), reply)) for (s, q, _, _), reply in zip(pairs, replies)
    ) / len(pairs)
    return right, chain_hops(pairs, replies)


def chain_hops(pairs: list[tuple[world.Scene, str, str, str]], replies: list[str]) -> str:
    """For evidence-first replies: which hop fails. Evidence right = the stated colour (or absence) is the
    scene's; verdict follows = "yes" exactly when the stated colour is the one asked about."""
    evidence = follows = parsed = 0
    for (scene, question, _, _), reply in zip(pairs, replies):
        spec = world.parse_question(question)
        m = re.match(r"\s*(?:the (\w+) is (\w+)|there is no (\w+)), so (yes|no)\b", reply.lower())
        if m is None or spec is None:
            continue
        parsed += 1
        stated = None if m.group(3) else m.group(2)  # None: "there is no <shape>"
        obj = scene.find(spec.shape)
        evidence += stated == (obj.color if obj else None)
        follows += (m.group(4) == "yes") == (stated == spec.color)
    if not parsed:
        return "no evidence-first replies"
    return (
        f"evidence-first replies {parsed}/{len(pairs)}: evidence right {evidence / parsed:.3f}, "
        f"verdict follows the evidence {follows / parsed:.3f}"
    )


def held_out_pairs(
    scenes: list[world.Scene], family: str, rng: random.Random
) -> list[tuple[world.Scene, str, str, str]]:
    """(scene, question, correct, plausible wrong) per held-out scene that can ask ``family``."""
    pairs = []
    for scene in scenes:
        if family not in world.families_for(scene):
            continue
        question, spec = world.random_question(scene, family, rng)
        wrong = plausible_wrong(scene, spec, rng)
        if wrong is not None:
            pairs.append((scene, question, world.answer(scene, spec), wrong))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a built world teacher folder (not modified)")
    parser.add_argument("--family", default="exist", choices=world.FAMILIES)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1.5e-3, help="constant AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chain", action="store_true", help="exist only: evidence-first targets (implies --generate)")
    parser.add_argument("--generate", action="store_true", help="also measure greedy replies, graded by the world")
    args = parser.parse_args()
    if args.chain and args.family != "exist":
        parser.error("--chain is defined for --family exist only")
    with tempfile.TemporaryDirectory(prefix="verification-probe-") as scratch:
        probe(args, Path(scratch))
    return 0


def probe(args: argparse.Namespace, scratch: Path) -> None:
    """Train one family's examples and print progress (module docstring); ``scratch`` holds saved copies."""
    generate = args.generate or args.chain

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    scorer = Scorer(args.model)
    model, tokenizer = scorer.model, scorer.tokenizer
    train = wt.training_scenes(3000, seed=11 + args.seed)  # private streams: not the build's, not the test split
    held = wt.training_scenes(150, seed=12 + args.seed)
    by_id = {s.image_id: s for s in (*train, *held)}
    pairs = held_out_pairs(held, args.family, random.Random(f"verification-probe:{args.seed}"))

    def ranked_right() -> float:
        model.eval()
        right = 0
        for start in range(0, len(pairs), 8):
            chunk = pairs[start : start + 8]
            lp = scorer.answer_logprobs([(s, q, a) for s, q, good, bad in chunk for a in (good, bad)], by_id)
            right += sum(lp[2 * i] > lp[2 * i + 1] for i in range(len(chunk)))
        model.train()
        return right / len(pairs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    rng = random.Random(f"verification-probe-train:{args.seed}")

    def progress() -> str:
        text = f"correct more likely {ranked_right():.3f}"
        if generate:
            right, hops = generated_accuracy(scorer, pairs, scratch)
            text += f" greedy replies right {right:.3f}" + (f" ({hops})" if args.chain else "")
            model.train()
        return text

    print(
        f"{args.family}{' (chain)' if args.chain else ''}: {len(pairs)} held-out pairs; step 0 {progress()}", flush=True
    )
    started, smooth = time.perf_counter(), None
    model.train()
    for step in range(1, args.steps + 1):
        examples = family_examples(train, args.family, args.batch_size, rng, chain=args.chain)
        batch = collate(
            [wt.encode_example(tokenizer, ex, scorer.image_seq_length, 384) for ex in examples], tokenizer.pad_token_id
        )
        batch["pixel_values"] = pixel_values(
            scorer.processor.image_processor, [world.render(by_id[ex.image_id]) for ex in examples]
        )
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            print(
                f"step {step} loss {smooth:.3f} {progress()} elapsed={time.perf_counter() - started:.0f}s", flush=True
            )


if __name__ == "__main__":
    sys.exit(main())
