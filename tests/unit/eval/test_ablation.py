"""mmdc/eval/ablation.py on synthetic run folders (no Ray): intervals over seeds, paired differences, the regime
figures (student accuracy on the cache pool, the referee's AUC, the teacher on hard vs easy, teacher answers per
point) and the parent shares that give plain distillation the same teacher budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from world_rows import ROWS, SCENES

from mmdc.eval import ablation
from mmdc.eval.ablation import Variant
from mmdc.eval.report import write_named_results


def fake_run(
    out: Path,
    name: str,
    seed: int,
    curve: list[float],
    hard: list[int],
    rows: int = 6,
    assessed: bool = True,
    exist: list[float] | None = None,
) -> Path:
    """A finished world run: scores per iteration, per iteration k >= 1 a teach (100 new answers at k = 1, then 50),
    an assessment of ``rows`` rows with ``hard[k - 1]`` hard (10 new answers) and, when ``assessed``, the graded
    assessment ``ROWS`` (plain distillation's has no answers and no scores)."""
    root = out / f"{name}-seed{seed}"
    world = root / "eval" / "world"
    for k, avg in enumerate(curve):
        families = {"exist": (exist or curve)[k], "color": avg - 1}
        write_named_results(world, f"iter_{k}", "world", {"Avg": avg, **families, "n": 10}, [])
    write_named_results(world, "teacher", "world", {"Avg": 50.0, "exist": 60.0, "color": 40.0}, [])
    (root / "data" / "world").mkdir(parents=True)
    (root / "data" / "world" / "scenes.jsonl").write_text("\n".join(json.dumps(s.to_dict()) for s in SCENES))
    (root / "assessments").mkdir()
    records: list[dict] = [{"iteration": 0, "phase": "eval", "rows": 10}]
    for k in range(1, len(curve)):
        records.append({"iteration": k, "phase": "teach", "rows": 100, "cache_misses": 100 if k == 1 else 50})
        assess = {"iteration": k, "phase": "assess", "rows": rows, "hard": hard[k - 1], "cache_misses": 10}
        if assessed:
            assess.update(easy=rows - 1 - hard[k - 1], unscored=1, hard_ratio=hard[k - 1] / (rows - 1))
            frame = pd.DataFrame(ROWS, columns=["image_id", "question", "teacher_answer", "student_answer", "d", "h"])
        else:
            assess.update(easy=rows - hard[k - 1], selection="random")
            frame = pd.DataFrame({"image_id": ["img0"], "question": ["Is there a red circle in the image?"]})
            frame = frame.assign(teacher_answer=None, student_answer=None, d=math.nan, h=True)
        records.append(assess)
        frame = frame.rename(columns={"d": "difficulty", "h": "hard"})
        frame = frame.assign(instruction_id=[f"i{n}" for n in range(len(frame))], score_student=5.0)
        frame["hard"] = frame["hard"].astype("boolean")
        frame.to_parquet(root / "assessments" / f"iter_{k}.parquet")
        records.append({"iteration": k, "phase": "augment", "generated": hard[k - 1], "acceptance_ratio": 0.5})
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (root / "state.json").write_text(json.dumps({"status": "finished"}))
    return root


def test_regime_of_one_run(tmp_path):
    root = fake_run(tmp_path, "mmdc", 0, [10.0, 30.0, 40.0], hard=[4, 2])
    regime = ablation.run_regime(root, {0: 10.0, 1: 30.0, 2: 40.0})
    one = regime[1]
    assert one["student_cache_accuracy"] == 50.0  # 2 of the 4 scored, readable rows
    assert one["referee_auc"] == 0.75
    assert one["teacher_hard_accuracy"] == pytest.approx(100 / 3) and one["teacher_easy_accuracy"] == 100.0
    assert one["hard_ratio"] == 0.8  # as the assessment recorded it (hard among scored)
    assert one["teacher_answers"] == 100.0 and one["gain"] == 20.0  # answers before the evaluation of iteration 1
    assert regime[2]["teacher_answers"] == 160.0 and regime[2]["gain"] == 30.0  # + assess 1 (10) + teach 2 (50)


def test_teacher_answers_so_far_counts_each_phase_before_the_evaluation():
    records = [
        {"iteration": 1, "phase": "teach", "cache_misses": 7},
        {"iteration": 1, "phase": "assess", "cache_misses": 3},
        {"iteration": 2, "phase": "teach", "cache_misses": 5},
        {"iteration": 2, "phase": "assess", "cache_misses": 1},
    ]
    assert [ablation.teacher_answers_so_far(records, k) for k in (1, 2, 3)] == [7.0, 15.0, 16.0]


def test_plain_distillation_has_its_random_share_and_no_assessment_figures(tmp_path):
    root = fake_run(tmp_path, "plain", 0, [10.0, 20.0], hard=[3], assessed=False)
    regime = ablation.run_regime(root, {0: 10.0, 1: 20.0})
    assert regime[1] == {"hard_ratio": 0.5, "teacher_answers": 100.0, "gain": 10.0}


def test_parent_shares_give_plain_the_mmdc_arms_budget(tmp_path):
    fake_run(tmp_path, "mmdc", 0, [10.0, 30.0, 40.0], hard=[4, 2])
    fake_run(tmp_path, "mmdc", 1, [10.0, 30.0, 40.0], hard=[3, 0])
    fake_run(tmp_path, "mmdc", 2, [10.0, 30.0], hard=[5])  # stopped after iteration 1
    assert ablation.parent_shares(tmp_path / "mmdc-seed0") == {1: 4 / 6, 2: 2 / 6}
    shares = ablation.measured_parent_shares(tmp_path, Variant("mmdc"), [0, 1, 2])
    assert shares == [round((4 + 3 + 5) / 18, 4), round(2 / 12, 4)]  # each iteration over the seeds that reached it
    assert ablation.measured_parent_shares(tmp_path, Variant("nothing"), [0]) is None


def _experiment(tmp_path) -> dict:
    for seed, (m, p) in enumerate([(40.0, 36.0), (44.0, 41.0), (38.0, 36.0)]):
        fake_run(tmp_path, "mmdc", seed, [10.0, 30.0, m], hard=[4, 2], exist=[5.0, 20.0, m + 4])
        fake_run(tmp_path, "plain", seed, [10.0, 28.0, p], hard=[3, 2], assessed=False, exist=[5.0, 20.0, p])
    variants = [Variant("mmdc", ("calibration.tau=0.33",)), Variant("plain", ("calibration.selection=random",))]
    command = "python -m mmdc.ablate --out x --preset plain --budget-from mmdc"
    return ablation.write_summary(tmp_path, variants, [0, 1, 2], pairs=[("mmdc", "plain")], command=command)


def test_summary_intervals_paired_differences_and_regime(tmp_path):
    summary = _experiment(tmp_path)
    final = summary["variants"]["mmdc"]["final"]["world"]["Avg"]
    assert final["mean"] == pytest.approx(122 / 3) and final["n"] == 3
    assert final["half"] == pytest.approx(4.302653 * final["std"] / math.sqrt(3))  # t with 2 df

    pair = summary["pairs"]["mmdc - plain"]
    avg = pair["final"]["world"]["Avg"]
    assert {s: c["diff"] for s, c in avg["per_seed"].items()} == {"0": 4.0, "1": 3.0, "2": 2.0}
    assert avg["mean"] == 3.0 and avg["half"] == pytest.approx(4.302653 / math.sqrt(3))  # sd of (4, 3, 2) is 1
    assert pair["final"]["world"]["exist"]["mean"] == 7.0  # mmdc's exist is its Avg + 4, plain's its Avg
    per_k = pair["per_iteration"]["world"]
    assert per_k["0"]["Avg"]["mean"] == 0.0 and per_k["0"]["Avg"]["half"] == 0.0  # same start, same seed
    assert per_k["1"]["Avg"]["mean"] == 2.0

    regime = summary["variants"]["mmdc"]["regime"]
    assert regime["1"]["referee_auc"]["mean"] == 0.75 and regime["1"]["student_cache_accuracy"]["mean"] == 50.0
    assert regime["1"][ablation.PER_POINT] == 5.0  # 100 answers for 20 points
    assert regime["2"][ablation.PER_POINT] == pytest.approx(160 / (122 / 3 - 10))
    plain = summary["variants"]["plain"]["regime"]
    assert plain["1"]["hard_ratio"]["mean"] == 0.5 and "referee_auc" not in plain["1"]
    assert plain["1"][ablation.PER_POINT] == pytest.approx(100 / 18)


def test_summary_markdown_opens_with_the_command_and_shows_intervals(tmp_path):
    _experiment(tmp_path)
    text = (tmp_path / ablation.SUMMARY_MD).read_text()
    assert text.startswith("# Ablation summary\n\nReproduce every table below")
    assert "    python -m mmdc.ablate --out x --preset plain --budget-from mmdc\n" in text
    assert text.index("python -m mmdc.ablate") < text.index("## Final score per benchmark")
    half = 4.302653 * 3.055050 / math.sqrt(3)  # sd of (40, 44, 38)
    assert f"| mmdc | `calibration.tau=0.33` | 3 | 40.67 ± {half:.2f} |" in text
    assert "## Paired difference mmdc - plain (same seed)" in text
    assert "| 0 | 40.00 | 36.00 | +4.00 |" in text
    assert "| mean [CI] |  |  | +3.00 [+0.52, +5.48] |" in text
    assert "| final | 3 | +3.00 [+0.52, +5.48] | +7.00 [+4.52, +9.48] |" in text
    assert "| 0 | 3 | +0.00 [+0.00, +0.00] |" in text
    assert "## The regime per arm and iteration" in text
    row = "| mmdc | 1 | 50.0 ± 0.0 | 0.80 ± 0.00 | 0.75 ± 0.00 | 33.3 ± 0.0 | 100.0 ± 0.0 | 100 ± 0 | 20.00 ± 0.00 |"
    assert row + " 5.0 |" in text
    assert "| plain | 1 | – | 0.50 ± 0.00 | – | – | – | 100 ± 0 | 18.00 ± 0.00 | 5.6 |" in text
    assert json.loads((tmp_path / ablation.SUMMARY_JSON).read_text())["command"].endswith("--budget-from mmdc")
