"""mmdc/ablate.py: variant parsing, the run plan, and the Tables 4/5 summary from synthetic run folders (no Ray)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from mmdc import ablate
from mmdc.ablate import Variant
from mmdc.eval.report import write_named_results

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("tau_0", Variant("tau_0", ("calibration.tau=0",))),
        ("lr:tune.lr=3e-3", Variant("lr", ("tune.lr=3e-3",))),
        ("two:tune.lr=3e-3, tune.epochs=3", Variant("two", ("tune.lr=3e-3", "tune.epochs=3"))),
        (
            "list:lora:tune.lora.target_modules=[q_proj, v_proj],tune.lora.enabled=true",
            None,
        ),  # a colon in the name is not allowed (checked below)
        (
            "mods:tune.lora.target_modules=[q_proj, v_proj],tune.lora.enabled=true",
            Variant("mods", ("tune.lora.target_modules=[q_proj, v_proj]", "tune.lora.enabled=true")),
        ),
    ],
)
def test_parse_variant(text, expected):
    if expected is None:
        with pytest.raises(ValueError, match="override"):
            ablate.parse_variant(text)
        return
    assert ablate.parse_variant(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("unknown", "or a preset"),
        ("a b:x=1", "the name must be"),
        ("x:", "no overrides"),
        ("x:tau", "key.path=value"),
        ("x:=1", "key.path=value"),
    ],
)
def test_parse_variant_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        ablate.parse_variant(text)


def test_presets_and_groups():
    assert ablate.PRESETS["no_stage1"] == ("align.enabled=false",)
    assert ablate.PRESETS["plain"] == ("calibration.selection=random",)
    table4 = ablate.resolve_variants(["table4"], [])
    assert [v.name for v in table4] == ["tau_0", "mmdc", "tau_0.67", "tau_1"]
    assert [v.overrides for v in table4][1] == ("calibration.tau=0.33",)
    assert [v.name for v in ablate.resolve_variants([], [])] == list(ablate.PRESETS)  # nothing given: all
    mixed = ablate.resolve_variants(["table5", "mmdc"], ["x:tune.lr=1"])
    assert [v.name for v in mixed] == ["mmdc", "no_stage1", "x"]  # each name once
    with pytest.raises(ValueError, match="used twice"):
        ablate.resolve_variants(["mmdc"], ["mmdc:calibration.tau=0.5"])
    with pytest.raises(ValueError, match="unknown preset"):
        ablate.resolve_variants(["table9"], [])


def test_seeds():
    assert ablate.parse_seeds("0, 1,2,1") == [0, 1, 2]
    for bad in ("", "a,b"):
        with pytest.raises(ValueError):
            ablate.parse_seeds(bad)


def test_every_preset_config_loads():
    ablate.validate(TINY, list(ablate.resolve_variants(["all"], [])), [0], ["run.iterations=1"])


def test_plan_starts_new_runs_resumes_unfinished_and_skips_finished(tmp_path):
    variants = [Variant("a", ("calibration.tau=0",))]
    (tmp_path / "a-seed1").mkdir()
    (tmp_path / "a-seed1" / "state.json").write_text(json.dumps({"status": "running"}))
    (tmp_path / "a-seed2").mkdir()
    (tmp_path / "a-seed2" / "state.json").write_text(json.dumps({"status": "finished"}))
    steps = ablate.plan(tmp_path, TINY, variants, [0, 1, 2], ["run.iterations=1"], ["--num-cpus", "2"])
    (p0, s0, argv0), (p1, s1, argv1), (p2, s2, _) = steps
    assert (s0, s1, s2) == ("new", "unfinished", "finished")
    assert argv0 == [
        "--config",
        TINY,
        "--output",
        str(tmp_path / "a-seed0"),
        "--num-cpus",
        "2",
        "--set",
        "run.iterations=1",
        "--set",
        "calibration.tau=0",
        "--set",
        "run.seed=0",
        "--set",
        "run.name=a-seed0",
    ]
    assert argv1 == ["--resume", str(tmp_path / "a-seed1"), "--num-cpus", "2"]
    calls = []

    def runner(argv):
        calls.append(argv)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 0

    outcomes = ablate.run_all(steps, runner)
    assert [o["rc"] for o in outcomes] == [0, 1, 0] and outcomes[2]["skipped"] and len(calls) == 2


def _fake_run(
    out: Path,
    name: str,
    seed: int,
    curve: list[float],
    families: dict | None = None,
    finished: bool = True,
    teacher: float | None = 90.0,
) -> None:
    root = out / f"{name}-seed{seed}"
    for k, avg in enumerate(curve):
        metrics = {"Avg": avg, "exist": avg + 1, **(families or {}), "n": 10, "correct": 1}
        write_named_results(root / "eval" / "world", f"iter_{k}", "world", metrics, [])
    if teacher is not None:
        write_named_results(root / "eval" / "world", "teacher", "world", {"Avg": teacher, "exist": 99.0}, [])
    (root / "state.json").write_text(json.dumps({"status": "finished" if finished else "running"}))
    records = [{"event": "deploy", "engine": "teacher"}]  # an event line: no phase, not counted
    for k in range(1, len(curve)):
        records += [
            {"iteration": k, "phase": "teach", "rows": 100 + 10 * k, "cache_misses": 100},
            {"iteration": k, "phase": "assess", "rows": 200, "hard_ratio": 0.5 + 0.1 * k, "cache_misses": 20},
            {"iteration": k, "phase": "augment", "generated": 60, "acceptance_ratio": 0.5},
        ]
    (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + '\n{"cut by a cra')


def test_summary_mean_and_confidence_interval_over_seeds(tmp_path):
    _fake_run(tmp_path, "mmdc", 0, [20.0, 40.0, 60.0])
    _fake_run(tmp_path, "mmdc", 1, [22.0, 44.0, 70.0])
    _fake_run(tmp_path, "plain", 0, [20.0, 30.0, 50.0])
    _fake_run(tmp_path, "plain", 1, [21.0, 35.0], finished=False)  # killed after iteration 1
    variants = [
        Variant("mmdc", ("calibration.tau=0.33",)),
        Variant("plain", ("calibration.selection=random",)),
        Variant("tau_1", ("calibration.tau=1",)),
    ]
    summary = ablate.write_summary(tmp_path, variants, [0, 1])
    final = summary["variants"]["mmdc"]["final"]["world"]["Avg"]
    assert final["mean"] == 65.0 and final["std"] == pytest.approx(statistics.stdev([60.0, 70.0])) and final["n"] == 2
    assert final["half"] == pytest.approx(12.7062 * final["std"] / 2**0.5, rel=1e-4)  # t with 1 df
    plain = summary["variants"]["plain"]
    # the killed run counts per iteration, not in the final score
    assert plain["final"]["world"]["Avg"]["mean"] == 50.0 and plain["final"]["world"]["Avg"]["n"] == 1
    assert plain["runs"]["1"]["iteration"] == 1 and plain["runs"]["1"]["finished"] is False
    assert summary["variants"]["tau_1"]["missing_seeds"] == [0, 1]
    assert summary["variants"]["mmdc"]["per_iteration"]["world"]["1"]["mean"] == 42.0
    assert summary["teacher"]["world"]["Avg"] == 90.0

    text = (tmp_path / ablate.SUMMARY_MD).read_text()
    assert "| variant | overrides | n | world Avg |" in text
    assert "| mmdc | `calibration.tau=0.33` | 2 | 65.00 ± 63.53 |" in text
    assert "| plain | `calibration.selection=random` | 1 | 50.00 |" in text
    assert "Runs not finished (left out of the final scores; their curves count per iteration): plain seed 1." in text
    assert "| tau_1 | `calibration.tau=1` | 0 | – |" in text
    assert "| teacher (reference) | – | – | 90.00 |" in text
    assert "| variant | Avg | exist |" in text and "| mmdc | 65.00 ± 63.53 | 66.00 ± 63.53 |" in text
    assert "| variant | iteration 0 | iteration 1 | iteration 2 |" in text
    assert "| plain | 20.50 ± 6.35 | 32.50 ± 31.77 | 50.00 |" in text  # one seed reached iteration 2: no interval
    per_column = summary["variants"]["mmdc"]["per_iteration_columns"]["world"]
    assert per_column["2"]["exist"]["mean"] == 66.0 and per_column["2"]["exist"]["n"] == 2
    assert "| variant | iteration | Avg | exist |" in text
    assert "| mmdc | 1 | 42.00 ± 25.41 | 43.00 ± 25.41 |" in text
    assert "| plain | 2 | 50.00 | 51.00 |" in text  # one seed reached iteration 2
    assert "tau_1: seeds 0, 1" in text and "plain seed 1" in text
    process = summary["variants"]["mmdc"]["process"]  # seed runs of 2 iterations: k = 1, 2
    assert process["tuning rows per iteration"]["mean"] == 115.0
    assert process["teacher answers generated"]["mean"] == 240.0  # (100 + 20) per iteration, summed
    assert process["hard ratio"]["mean"] == pytest.approx(0.65)
    assert (
        "| variant | tuning rows per iteration | teacher answers generated | hard ratio | "
        "questions generated per iteration | acceptance ratio |"
    ) in text
    assert "| mmdc | 115.0 ± 0.0 | 240.0 ± 0.0 | 0.65 ± 0.00 | 60.0 ± 0.0 | 0.50 ± 0.00 |" in text
    assert json.loads((tmp_path / ablate.SUMMARY_JSON).read_text())["seeds"] == [0, 1]


def test_summary_with_no_results_says_so(tmp_path):
    text = ablate.render_summary(ablate.build_summary(tmp_path, [Variant("mmdc")], [0]))
    assert "No run has evaluation results yet." in text


def test_cli_dry_run_and_config_errors(tmp_path, capsys):
    assert (
        ablate.main(["--config", TINY, "--out", str(tmp_path), "--seeds", "3", "--preset", "table5", "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "mmdc-seed3 [new]" in out and "no_stage1-seed3 [new]" in out and "align.enabled=false" in out
    assert ablate.main(["--config", TINY, "--out", str(tmp_path), "--variant", "x:calibration.taux=1"]) == 2
    assert "unknown config key 'calibration.taux'" in capsys.readouterr().err
    assert ablate.main(["--out", str(tmp_path), "--variant", "nope"]) == 2
    _fake_run(tmp_path, "mmdc", 0, [10.0, 20.0])
    assert ablate.main(["--out", str(tmp_path), "--preset", "mmdc", "--seeds", "0", "--summarize-only"]) == 0
    assert "| mmdc | `calibration.tau=0.33` | 1 | 20.00 |" in (tmp_path / "summary.md").read_text()


def test_experiment_group_pairs_and_which_arms_get_the_budget():
    experiment = ablate.resolve_variants(["experiment"], [])
    assert [v.name for v in experiment] == ["mmdc", "plain", "tau_0", "tau_0.67", "tau_1"]
    assert ablate.parse_pairs([], experiment) == [("mmdc", "plain")]  # the default pair, when both run
    assert ablate.parse_pairs([], experiment[2:]) == []
    assert ablate.parse_pairs(["tau_0:mmdc", "tau_0:mmdc"], experiment) == [("tau_0", "mmdc")]
    for bad in ("mmdc", "mmdc:nope", "mmdc:mmdc"):
        with pytest.raises(ValueError, match="--pair"):
            ablate.parse_pairs([bad], experiment)
    plain = Variant("plain", ("calibration.selection=random",))
    assert ablate.needs_budget(plain) and not ablate.needs_budget(Variant("mmdc", ("calibration.tau=0.33",)))
    assert not ablate.needs_budget(Variant("p", ("calibration.selection=random", "calibration.random_fraction=0.3")))
    given = ablate.with_shares(plain, [0.8125, 0.25])
    assert given.overrides[-1] == "calibration.random_fractions=[0.8125, 0.25]"
    ablate.validate(TINY, [given], [0], ["run.iterations=2"])  # a config that loads


def _runner(calls: list[list[str]]):
    """Stands in for mmdc.run.main: writes a finished two-iteration run where --output points; an mmdc run's
    assessments send 3 of 4 and then 1 of 4 cache-pool rows to the augmentor."""

    def run(argv: list[str]) -> int:
        calls.append(argv)
        root = Path(argv[argv.index("--output") + 1])
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        seed = int(next(s for s in sets if s.startswith("run.seed=")).split("=")[1])
        for k, avg in enumerate([10.0, 20.0 + seed, 30.0 + seed]):
            write_named_results(root / "eval" / "world", f"iter_{k}", "world", {"Avg": avg, "n": 10}, [])
        random = "calibration.selection=random" in sets
        records = []
        for k, hard in ((1, 3), (2, 1)):
            records.append({"iteration": k, "phase": "teach", "rows": 8, "cache_misses": 8})
            assess = {"iteration": k, "phase": "assess", "rows": 4, "hard": 2 if random else hard}
            records.append({**assess, "easy": 4 - assess["hard"], **({"selection": "random"} if random else {})})
        (root / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
        (root / "state.json").write_text(json.dumps({"status": "finished"}))
        return 0

    return run


def test_budget_from_runs_the_source_first_and_gives_plain_its_shares(tmp_path, monkeypatch, capsys):
    import mmdc.run

    calls: list[list[str]] = []
    monkeypatch.setattr(mmdc.run, "main", _runner(calls))
    out = str(tmp_path / "abl")
    argv = ["--config", TINY, "--out", out, "--seeds", "0,1", "--preset", "plain", "--budget-from", "mmdc"]
    argv += ["--variant", "tau_1", "--set", "run.iterations=2"]
    assert ablate.main(["--variant", "plain", "--budget-from", "mmdc", "--out", out]) == 2  # no mmdc arm
    assert ablate.main([*argv, "--dry-run"]) == 0
    assert "from mmdc's runs once they ran" in capsys.readouterr().out and not calls

    assert ablate.main(argv) == 0
    names = [Path(c[c.index("--output") + 1]).name for c in calls]
    assert names == ["mmdc-seed0", "mmdc-seed1", "plain-seed0", "plain-seed1", "tau_1-seed0", "tau_1-seed1"]
    assert (
        "calibration.random_fractions=[0.75, 0.25]" in calls[2]
        and "calibration.random_fractions=[0.75, 0.25]" in calls[3]
    )
    assert not any("random_fractions" in a for c in calls[:2] + calls[4:] for a in c)

    text = (tmp_path / "abl" / ablate.SUMMARY_MD).read_text()
    command = "python -m mmdc.ablate " + " ".join(argv)
    assert text.split("\n")[4] == "    " + command  # the command comes first
    assert "| plain | `calibration.selection=random, calibration.random_fractions=[0.75, 0.25]` | 2 |" in text
    assert "## Paired difference mmdc - plain (same seed)" in text

    calls.clear()  # run again: every run is finished and kept; the summary keeps its command
    assert ablate.main([*argv, "--summarize-only"]) == 0 and not calls
    assert ablate.main(["--out", out, "--preset", "plain", "--seeds", "0,1", "--summarize-only"]) == 0
    assert command in (tmp_path / "abl" / ablate.SUMMARY_MD).read_text()
    assert ablate.main([*argv, "--dry-run"]) == 0
    assert "plain-seed0 [finished]" in capsys.readouterr().out
