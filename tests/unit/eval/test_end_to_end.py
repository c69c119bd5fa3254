"""Each benchmark end to end through the real engine code: ``python -m mmdc.eval`` on the tiny student.

The tiny student is untrained, so its answers are mostly wrong or unreadable;
what these tests check is everything around the model: the fixture read in its
real format, prompts and images reaching ``HFGenerator``, every reply parsed or
counted as failed, the three report files, and per-row seeds that make the
answers independent of the batch size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc.eval import cli, report
from mmdc.eval.scienceqa import ANSWER_SUFFIX

ASSETS = Path(__file__).parents[2] / "assets" / "eval"


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / report.SAMPLES_FILE).read_text().splitlines()]


def test_scienceqa(tiny_student, tmp_path):
    sqa = ASSETS / "scienceqa"

    def argv(out: Path) -> list[str]:
        return [
            "--checkpoint",
            tiny_student,
            "--benchmark",
            "scienceqa",
            "--data",
            str(sqa / "llava_test_CQM-A.json"),
            "--problems",
            str(sqa / "problems.json"),
            "--pid-splits",
            str(sqa / "pid_splits.json"),
            "--out",
            str(out),
            "--max-new-tokens",
            "6",
            "--limit",
            "3",
        ]

    out = tmp_path / "sqa"
    payload = cli.run(cli.parse_args(argv(out)))
    assert payload["benchmark"] == "scienceqa" and payload["metrics"]["n"] == 3
    assert payload["meta"]["temperature"] == 0.5  # paper 4.1.3
    samples = _samples(out)
    assert [s["id"] for s in samples] == ["1", "2", "3"]
    for s in samples:
        assert s["prompt"].endswith(ANSWER_SUFFIX) and isinstance(s["output"], str)
        assert s["correct"] == (s["parsed"] == s["answer"])
    assert payload["metrics"]["correct"] == sum(s["correct"] for s in samples)
    table = (out / report.TABLE_FILE).read_text()
    assert "| Model | Avg | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 |" in table
    assert "| student |" in table
    # Per-row seeds: a rerun with a different batch size gives the same answers.
    again = cli.run(cli.parse_args(argv(tmp_path / "again") + ["--batch-size", "1"]))
    assert again["metrics"] == payload["metrics"]
    assert [s["output"] for s in _samples(tmp_path / "again")] == [s["output"] for s in samples]


def test_seed_bench(tiny_student, tmp_path):
    data = ASSETS / "seed" / "SEED-Bench.json"
    out = tmp_path / "seed"
    payload = cli.run(
        cli.parse_args(
            [
                "--checkpoint",
                tiny_student,
                "--benchmark",
                "seed",
                "--data",
                str(data),
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
            ]
        )
    )
    metrics = payload["metrics"]
    samples = _samples(out)
    assert metrics["n"] == len(samples) > 0  # image questions only: the fixture's video question is left out
    assert metrics["failed"] == sum(s["parsed"] is None for s in samples)
    assert metrics["correct"] == sum(s["correct"] for s in samples)
    assert metrics["Avg"] == round(100 * metrics["correct"] / metrics["n"], 2)
    for s in samples:
        assert isinstance(s["output"], str) and s["correct"] == (s["parsed"] == s["answer"])
    assert "| Avg |" in (out / report.TABLE_FILE).read_text()
    assert json.loads((out / report.RESULTS_FILE).read_text())["metrics"]["n"] == metrics["n"]


def test_llava_bench_with_a_local_judge(tiny_models, tmp_path):
    lb = ASSETS / "llavabench"
    out = tmp_path / "lb"
    payload = cli.run(
        cli.parse_args(
            [
                "--checkpoint",
                tiny_models["student"],
                "--benchmark",
                "llavabench",
                "--data",
                str(lb / "questions.jsonl"),
                "--answers",
                str(lb / "answers_gpt4.jsonl"),
                "--context",
                str(lb / "context.jsonl"),
                "--judge-checkpoint",
                tiny_models["teacher"],
                "--out",
                str(out),
                "--max-new-tokens",
                "8",
            ]
        )
    )
    metrics = payload["metrics"]
    samples = _samples(out)
    assert payload["meta"]["judge"] == tiny_models["teacher"]
    assert metrics["n"] == len(samples) == 3
    # An untrained judge rarely writes two scores: every reply is either scored or counted, never guessed.
    scored = [s for s in samples if s["parsed"] is not None]
    assert metrics["unparsed"] == len(samples) - len(scored)
    assert all(s["error"] for s in samples if s["parsed"] is None)
    assert all(isinstance(s["judge_reply"], str) and isinstance(s["output"], str) for s in samples)
    assert "| Model | Con | CR | DD | AVG |" in (out / report.TABLE_FILE).read_text()
