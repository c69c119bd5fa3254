"""mmdc/report.py: report.md from metrics.jsonl and eval/<benchmark>/*.json, with the per-iteration plot (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from mmdc.eval.report import write_named_results
from mmdc.report import PLOT_FILE, render, write_report
from mmdc.rundir import RunDir

FAMILIES = ["exist", "color", "count", "spatial", "compare", "describe"]


def _world(avg: float, n: int = 72, **families) -> dict:
    metrics = {"Avg": avg, **{f: families.get(f) for f in FAMILIES}, "n": n, "correct": round(avg * n / 100)}
    return metrics


def _write_run(root: Path) -> RunDir:
    rd = RunDir(root)
    rd.log_metrics({"iteration": 0, "phase": "prepare", "rows": 120, "wall_s": 1.0})
    rd.log_metrics({"iteration": 1, "phase": "teach", "rows": 120, "conversations": 40, "wall_s": 10.0})
    rd.log_metrics(
        {"iteration": 1, "phase": "assess", "rows": 120, "hard": 30, "easy": 90, "hard_ratio": 0.25, "wall_s": 20.0}
    )
    world = root / "eval" / "world"
    write_named_results(world, "teacher", "world", _world(90.0, exist=100.0, describe=75.0), [], {"label": "teacher"})
    for k, avg in enumerate([20.0, 45.5, 61.25]):
        write_named_results(
            world,
            f"iter_{k}",
            "world",
            _world(avg, exist=avg + 10, describe=None),
            [{"id": "x"}],
            {"label": "student", "iteration": k},
        )
    mc = root / "eval" / "world_mc"
    for k, (avg, failed) in enumerate([(25.0, 72), (30.0, 10)]):
        write_named_results(mc, f"iter_{k}", "world_mc", {"Avg": avg, "exist": avg, "n": 72, "failed": failed}, [])
    (mc / "questions.json").write_text("[]")  # not a results file: ignored
    return rd


def test_report_has_per_iteration_tables_teacher_row_plot_and_phase_tables(tmp_path):
    rd = _write_run(tmp_path)
    write_report(rd)
    text = rd.report.read_text()
    assert "## Student vs teacher per iteration" in text
    assert f"![accuracy per iteration]({PLOT_FILE.as_posix()})" in text
    assert "| model | Avg | exist | color | count | spatial | compare | describe |" in text
    assert "| teacher (reference) | 90.00 | 100.00 | - | - | - | - | 75.00 |" in text
    assert "| iteration 0 | 20.00 | 30.00 |" in text and "| iteration 2 | 61.25 | 71.25 |" in text
    # rows in order: teacher, then iterations ascending
    assert text.index("teacher (reference) | 90.00") < text.index("iteration 0 | 20.00") < text.index("iteration 2")
    assert "failed (counted wrong): iteration 0 72, iteration 1 10" in text
    # the phase tables are still there, after the evaluation
    assert "### teach" in text and "### assess" in text and text.index("## Student vs") < text.index("### teach")
    png = tmp_path / PLOT_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_is_a_real_image_with_one_panel_per_benchmark(tmp_path):
    from PIL import Image

    write_report(_write_run(tmp_path))
    with Image.open(tmp_path / PLOT_FILE) as image:
        width, height = image.size
    assert width > 1.5 * height  # two panels side by side


def test_report_without_evaluation_keeps_the_phase_tables(tmp_path):
    rd = RunDir(tmp_path)
    rd.log_metrics({"iteration": 1, "phase": "tune", "train_final_loss": 1.5, "wall_s": 3.0})
    write_report(rd)
    text = rd.report.read_text()
    assert "Student vs teacher" not in text and "### tune" in text and not (tmp_path / PLOT_FILE).exists()


def test_teacher_only_gives_a_table_but_no_plot(tmp_path):
    write_named_results(tmp_path / "eval" / "world", "teacher", "world", _world(90.0), [])
    write_report(RunDir(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "| teacher (reference) | 90.00 |" in text and "![" not in text


def test_render_is_pure_given_results():
    evals = {
        "world": {
            "iter_1": {"benchmark": "world", "metrics": {"Avg": 50.0, "n": 4}, "columns": ["Avg"]},
            "iter_0": {"benchmark": "world", "metrics": {"Avg": 25.0, "n": 4}, "columns": ["Avg"]},
        }
    }
    text = render([], "r", evals, None)
    assert text.index("| iteration 0 | 25.00 |") < text.index("| iteration 1 | 50.00 |")
    assert "n = 4 per model." in text
    json.dumps(evals)  # results stay plain JSON


def test_finetuned_scienceqa_is_shown_as_table_1_beside_the_last_zero_shot_result(tmp_path):
    rd = RunDir(tmp_path)
    rd.log_metrics({"iteration": 1, "phase": "finetune", "rows": 8, "text_only": 4, "train_steps": 2, "wall_s": 3.0})
    sqa = tmp_path / "eval" / "scienceqa"
    table1 = {"Avg": 91.94, "NAT": 91.83, "SOC": 95.95, "LAN": 88.91, "TXT": 90.91, "IMG": 89.94, "NO": 91.08}
    table1.update({"G1-6": 92.47, "G7-12": 90.97})
    for k, avg in enumerate([40.0, 55.0]):
        write_named_results(sqa, f"iter_{k}", "scienceqa", {**{c: avg for c in table1}, "n": 4, "failed": 1}, [])
    meta = {"finetune": {"data": "llava_train_QCM-LEA.json", "epochs": 6, "lr": 2e-5}}
    write_named_results(sqa, "finetuned", "scienceqa", {**table1, "n": 4, "correct": 4, "failed": 0}, [], meta)
    text = write_report(rd).read_text()
    section = text[text.index("## ScienceQA after fine-tuning") :]
    assert "for 6 epochs at lr 2e-05 on `llava_train_QCM-LEA.json`" in section
    assert "| model | Avg | NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 |" in section
    assert "| fine-tuned on the train split | 91.94 | 91.83 | 95.95 |" in section
    assert "| zero-shot (iteration 1) | 55.00 |" in section and "iteration 0) |" not in section
    assert "n: 4; correct: 4; failed: 0." in section
    assert "| iteration 1 | 55.00 |" in text  # the zero-shot per-iteration table stays as it was
    assert "### finetune" in text  # the phase table


def test_report_opens_with_student_vs_teacher_then_calibration_then_phases(tmp_path):
    rd = _write_run(tmp_path)
    rd.log_metrics(
        {
            "iteration": 1,
            "phase": "augment",
            "rows": 30,
            "generated": 30,
            "accepted": 20,
            "acceptance_ratio": 0.6667,
            "rejected": {"duplicate": 3, "too_similar": 7},
            "wall_s": 5.0,
        }
    )
    text = write_report(rd).read_text()
    # student vs teacher: the headline of every benchmark, the student's share of the teacher's
    assert "| model | world Avg | % of teacher | world_mc Avg |" in text
    assert "| teacher (reference) | 90.00 | 100 % | – |" in text
    assert "| iteration 2 | 61.25 | 68 % | – |" in text and "| iteration 1 | 45.50 | 51 % | 30.00 |" in text
    # calibration per iteration: hard ratio, accepted, rejected by reason (most frequent first)
    assert "| 1 | 120 | 30 | 90 | – | 0.25 | 30 | 30 | 20 | 0.6667 | too_similar 7, duplicate 3 |" in text
    order = ["## Student vs teacher", "![accuracy", "### World test split", "## Calibration per iteration", "## Phases"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    assert text.index("## Phases") < text.index("### teach") < text.index("### augment")


def test_plain_distillation_shows_its_random_share_as_the_hard_ratio():
    metrics = [{"iteration": 1, "phase": "assess", "rows": 10, "selection": "random", "hard": 4, "easy": 6}]
    text = render(metrics, "plain")
    assert "| 1 | 10 | 4 | 6 | – | 0.4 | – | – | – | – | – |" in text
    assert "Parents drawn at random" in text and "Student vs teacher" not in text
