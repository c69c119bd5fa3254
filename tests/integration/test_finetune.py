"""Paper Table 1's protocol as one command, on the ScienceQA fixture with the tiny student (2 CPU Ray Train workers).

``python -m mmdc.finetune`` fine-tunes with the config's tune section (here with DDP) on the fixture's train split,
half of it text-only, and scores the test split; a run with ``eval.scienceqa.finetune`` does the same after its
last iteration (DeepSpeed ZeRO-2, configs/tiny.yaml's) and shows it in report.md beside the zero-shot result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc.eval.scienceqa import COLUMNS

pytestmark = pytest.mark.integration

SQA = Path(__file__).parents[1] / "assets" / "eval" / "scienceqa"
FEW_STEPS = ["tune.epochs=1", "tune.global_batch_size=4", "tune.micro_batch_size=2"]  # 8 rows -> 2 steps


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_finetune_cli_trains_saves_and_scores_table_1(ray_cluster, tiny_student, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from mmdc.finetune import main

    out = tmp_path / "sqa"
    argv = [
        "--checkpoint",
        tiny_student,
        "--benchmark",
        "scienceqa",
        "--data",
        str(SQA / "llava_train_QCM-LEA.json"),
        "--images",
        str(SQA / "images" / "train"),
        "--output",
        str(out),
        "--eval-data",
        str(SQA / "llava_test_CQM-A.json"),
        "--problems",
        str(SQA / "problems.json"),
        "--pid-splits",
        str(SQA / "pid_splits.json"),
        "--max-new-tokens",
        "6",
        # DDP here, ZeRO-2 (configs/tiny.yaml) in the run below: a rank's micro batch of text-only rows must keep
        # the projector in the graph under both
        *_sets([*FEW_STEPS, "tune.strategy=ddp"]),
    ]
    assert main(argv) == 0

    record = json.loads((out / "finetune.json").read_text())
    assert record["data"] == {"rows": 8, "with_image": 4, "text_only": 4, "skipped": 0}
    assert record["summary"]["steps"] == 2 and record["summary"]["samples"] == 8  # image anchors not counted
    assert record["summary"]["world_size"] == 2
    assert (out / "skipped.jsonl").read_text() == ""
    model = LlavaForConditionalGeneration.from_pretrained(out / "checkpoint")
    AutoProcessor.from_pretrained(out / "checkpoint")
    before = LlavaForConditionalGeneration.from_pretrained(tiny_student)
    lm = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not model.state_dict()[lm].equal(before.state_dict()[lm])  # the language model was tuned

    results = json.loads((out / "finetuned.json").read_text())
    assert results["benchmark"] == "scienceqa" and results["columns"] == list(COLUMNS)
    assert set(COLUMNS) <= set(results["metrics"]) and results["metrics"]["n"] == 4
    assert results["meta"]["model"] == str(out / "checkpoint")
    assert results["meta"]["finetune"]["epochs"] == 1 and results["meta"]["finetune"]["lr"] == 2e-5  # paper lr
    assert len((out / "finetuned.samples.jsonl").read_text().splitlines()) == 4
    assert "| Avg | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 |" in (out / "finetuned.md").read_text()


def test_a_run_with_eval_scienceqa_finetune_ends_with_table_1(ray_cluster, tmp_path):
    """The run option: after the last iteration (here stage 0, to stay small) the driver fine-tunes the final
    student, scores it into eval/scienceqa/finetuned.json and report.md, and keeps the zero-shot result."""
    from mmdc.run import main

    run_dir = tmp_path / "run"
    overrides = [
        "run.iterations=0",
        "align.enabled=false",
        "models.teacher=tiny:random-teacher",  # never deployed here: no world teacher to build
        "data.world.num_images=4",
        "data.world.questions_per_image=1",
        "data.world.test_images=1",
        "eval.benchmarks=[scienceqa]",
        "eval.teacher=false",
        "eval.max_new_tokens=4",
        f"eval.scienceqa.data={SQA / 'llava_test_CQM-A.json'}",
        f"eval.scienceqa.problems={SQA / 'problems.json'}",
        f"eval.scienceqa.pid_splits={SQA / 'pid_splits.json'}",
        "eval.scienceqa.finetune.enabled=true",
        f"eval.scienceqa.finetune.data={SQA / 'llava_train_QCM-LEA.json'}",
        f"eval.scienceqa.finetune.images={SQA / 'images' / 'train'}",
        "eval.scienceqa.finetune.epochs=1",
        "eval.scienceqa.finetune.max_new_tokens=4",
        *FEW_STEPS[1:],
    ]
    assert main(["--output", str(run_dir), *_sets(overrides)]) == 0

    state = json.loads((run_dir / "state.json").read_text())
    assert {"iteration": 0, "phase": "finetune"} in [
        {k: c[k] for k in ("iteration", "phase")} for c in state["completed"]
    ]
    assert (run_dir / "checkpoints" / "scienceqa" / "config.json").exists()
    finetuned = json.loads((run_dir / "eval" / "scienceqa" / "finetuned.json").read_text())
    zero_shot = json.loads((run_dir / "eval" / "scienceqa" / "iter_0.json").read_text())
    assert finetuned["columns"] == zero_shot["columns"] == list(COLUMNS)
    assert finetuned["meta"]["model"] == str(run_dir / "checkpoints" / "scienceqa")
    phase = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    phase = next(m for m in phase if m.get("phase") == "finetune")
    assert (phase["rows"], phase["text_only"], phase["train_steps"]) == (8, 4, 2)
    report = (run_dir / "report.md").read_text()
    assert "## ScienceQA after fine-tuning on its train split (paper Table 1)" in report
    assert "| fine-tuned on the train split |" in report and "| zero-shot (iteration 0) |" in report
