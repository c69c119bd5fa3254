"""mmdc/eval/iteration.py: evaluation during a run writes eval/<benchmark>/iter_<k>.json, per-sample JSONL, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc.config import ConfigError, config_from_dict, load_config
from mmdc.eval import iteration
from mmdc.eval.harness import row_seed
from mmdc.world import scenes as world

ASSETS = Path(__file__).parents[2] / "assets" / "eval"


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    world.generate_world(root, num_images=0, questions_per_image=2, seed=0, test_images=6)
    return root


class Scripted:
    """A Generator that answers from a function of the request and records what it was asked."""

    def __init__(self, reply=lambda request: "Yes."):
        self.reply, self.requests = reply, []

    def generate(self, requests):
        self.requests.extend(requests)
        return [{"text": self.reply(r)} for r in requests]


def _text(request: dict) -> str:
    content = request["messages"][-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def test_student_results_files_and_requests(world_dir, tmp_path):
    cfg = load_config(None, ["eval.benchmarks=[world, world_mc]"])
    gen = Scripted()
    results = iteration.evaluate_iteration(cfg, tmp_path, 2, "student", gen, world_dir, model="ckpt/iter_2")
    assert set(results) == {"world", "world_mc"}
    for benchmark in ("world", "world_mc"):
        payload = json.loads((tmp_path / "eval" / benchmark / "iter_2.json").read_text())
        assert payload["benchmark"] == benchmark and payload["metrics"]["n"] == 12
        assert payload["columns"][:2] == ["Avg", "exist"]
        assert payload["meta"]["label"] == "student" and payload["meta"]["iteration"] == 2
        assert payload["meta"]["model"] == "ckpt/iter_2" and payload["meta"]["temperature"] == 0.5
        samples = (tmp_path / "eval" / benchmark / "iter_2.samples.jsonl").read_text().splitlines()
        assert len(samples) == 12 and {"prompt", "output", "correct", "seed", "family"} <= set(json.loads(samples[0]))
    assert (
        tmp_path / "eval" / "world_mc" / "questions.json"
    ).is_file()  # reproducible by hand with python -m mmdc.eval
    first = gen.requests[0]
    assert first["messages"][0]["role"] == "user"  # the student gets the bare question, no system prompt
    assert first["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert first["seed"] == row_seed(0, "world", "test_000000-0")
    assert "Answer with the option's letter" in _text(gen.requests[12])  # world_mc follows world
    # "Yes." is right exactly on the yes-questions
    world_metrics = results["world"]["metrics"]
    assert 0 < world_metrics["Avg"] < 100 and world_metrics["describe"] in (None, 0.0)
    assert iteration.headline_metrics(results) == {
        "eval_world_Avg": world_metrics["Avg"],
        "eval_world_mc_Avg": results["world_mc"]["metrics"]["Avg"],
    }


def test_existing_result_is_kept_and_requests_are_the_same_every_time(world_dir, tmp_path):
    cfg = load_config(None, ["eval.benchmarks=[world, world_mc]"])
    first = Scripted()
    iteration.evaluate_iteration(cfg, tmp_path, 1, "student", first, world_dir, model="m1")
    again = Scripted()
    iteration.evaluate_iteration(cfg, tmp_path, 1, "student", again, world_dir, model="m1")
    assert again.requests == []  # a resumed run does not ask twice
    iteration.evaluate_iteration(cfg, tmp_path, 1, "student", again, world_dir, model="m2")  # another model: asked
    assert [r["seed"] for r in again.requests] == [r["seed"] for r in first.requests]
    assert again.requests[0]["messages"] == first.requests[0]["messages"]


def test_teacher_is_asked_with_its_table6_prompt_and_written_as_teacher(world_dir, tmp_path):
    cfg = load_config(None, ["eval.benchmarks=[world]"])
    gen = Scripted()
    iteration.evaluate_iteration(cfg, tmp_path, 0, "teacher", gen, world_dir)
    assert gen.requests[0]["messages"][0]["role"] == "system"
    assert _text(gen.requests[0]).startswith("[Question]\n")
    payload = json.loads((tmp_path / "eval" / "world" / "teacher.json").read_text())
    assert payload["meta"]["label"] == "teacher" and payload["meta"]["iteration"] is None
    assert list(iteration.load_results(tmp_path)) == ["world"]


def test_external_benchmarks_from_config_with_limit_and_judge(tmp_path):
    cfg = config_from_dict(
        {
            "data": {"source": "llava", "instructions": "x.json"},
            "eval": {
                "benchmarks": ["scienceqa", "seed", "llavabench"],
                "limit": 2,
                "scienceqa": {
                    "data": str(ASSETS / "scienceqa" / "llava_test_CQM-A.json"),
                    "problems": str(ASSETS / "scienceqa" / "problems.json"),
                },
                "seed": {"data": str(ASSETS / "seed" / "SEED-Bench.json")},
                "llavabench": {
                    "data": str(ASSETS / "llavabench" / "questions.jsonl"),
                    "answers": str(ASSETS / "llavabench" / "answers_gpt4.jsonl"),
                },
            },
        }
    )
    assert iteration.needs_judge(cfg)
    with pytest.raises(ValueError, match="llavabench needs a judge"):
        iteration.evaluate_iteration(cfg, tmp_path / "nojudge", 1, "student", Scripted(lambda r: "A"))
    judge = Scripted(lambda r: "8 6\nfine")
    results = iteration.evaluate_iteration(cfg, tmp_path, 1, "student", Scripted(lambda r: "A"), judge=judge)
    assert results["scienceqa"]["metrics"]["n"] == 2 and "NAT" in results["scienceqa"]["columns"]
    assert results["seed"]["meta"]["temperature"] == 0.1 and results["seed"]["metrics"]["n"] == 2
    assert results["llavabench"]["metrics"]["AVG"] == 75.0 and len(judge.requests) == 2
    assert iteration.headline_metrics(results)["eval_llavabench_AVG"] == 75.0


def test_config_checks_benchmarks_before_a_run():
    with pytest.raises(ConfigError, match="set eval.scienceqa.data"):
        load_config(None, ["eval.benchmarks=[scienceqa]"])
    with pytest.raises(ConfigError, match="eval.llavabench.answers"):
        load_config(None, ["eval.benchmarks=[llavabench]", "eval.llavabench.data=q.jsonl"])
    with pytest.raises(ConfigError, match="no world"):
        load_config(None, ["data.source=llava", "data.instructions=x.json", "eval.benchmarks=[world]"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, ["eval.benchmarks=[mmlu]"])
    from mmdc.config import eval_benchmarks

    assert eval_benchmarks(load_config(None)) == ["world"]  # the embedded default: the world, free-form
    assert eval_benchmarks(load_config(None, ["data.source=llava", "data.instructions=x.json"])) == []
    assert eval_benchmarks(load_config(None, ["eval.enabled=false"])) == []


def test_serve_generator_goes_through_the_engine_client_with_retries(monkeypatch):
    from mmdc.eval import serve
    from mmdc.eval.serve import ServeGenerator

    calls = []

    class FlakyClient:
        def generate(self, requests):
            calls.append(len(requests))
            if len(calls) == 1:
                return [TimeoutError("slow replica")] + [{"text": "ok"}] * (len(requests) - 1)
            return [{"text": "again"} for _ in requests]

    monkeypatch.setattr(serve, "make_client", lambda engine, app, deployment, timeout_s: FlakyClient())
    cfg = load_config(None, ["engines.student.retry_backoff_s=0"])
    gen = ServeGenerator("student", "hf-student", cfg.engines["student"])
    out = gen.generate([{"messages": [], "seed": 1}, {"messages": [], "seed": 2}])
    assert [o["text"] for o in out] == ["again", "ok"] and calls == [2, 1]  # only the failed row is retried


def test_end_to_end_tiny_student_on_a_tiny_world(world_dir, tmp_path):
    """The real engine code (HFGenerator) on the tiny student: both world benchmarks, deterministic."""
    import torch

    from mmdc.engines.hf import HFGenerator
    from mmdc.world.tiny import ensure_tiny_models

    torch.set_num_threads(1)
    from mmdc.world.models import models_dir

    student = ensure_tiny_models(models_dir(), world.world_corpus(), seed=0)["student"]
    gen = HFGenerator(student, max_batch_size=16)
    cfg = load_config(None, ["eval.limit=6", "eval.benchmarks=[world, world_mc]"])
    results = iteration.evaluate_iteration(cfg, tmp_path / "a", 0, "student", gen, world_dir, model=student)
    assert results["world"]["metrics"]["n"] == 6 and results["world_mc"]["metrics"]["n"] == 6
    samples = [
        json.loads(line)
        for line in (tmp_path / "a" / "eval" / "world" / "iter_0.samples.jsonl").read_text().splitlines()
    ]
    assert all(
        isinstance(s["output"], str)
        and s["correct"]
        == world.grade(world.load_scenes(world_dir / "scenes.jsonl")[s["image"][:-4]], s["prompt"], s["output"])
        for s in samples
    )
    again = iteration.evaluate_iteration(cfg, tmp_path / "b", 0, "student", gen, world_dir, model=student)
    rerun = [
        json.loads(line)
        for line in (tmp_path / "b" / "eval" / "world" / "iter_0.samples.jsonl").read_text().splitlines()
    ]
    assert [s["output"] for s in rerun] == [s["output"] for s in samples]
    assert again["world_mc"]["metrics"] == results["world_mc"]["metrics"]


def test_an_endpoint_judge_uses_the_openai_client_with_its_key_variable_and_retries(monkeypatch):
    from mmdc.engines.openai import OpenAIChatClient
    from mmdc.eval.serve import endpoint_judge

    monkeypatch.setenv("JUDGE_KEY", "secret")
    judge = endpoint_judge("http://127.0.0.1:9/v1", "gpt-4o", api_key_env="JUDGE_KEY")
    assert isinstance(judge.client, OpenAIChatClient) and judge.role == "judge"
    assert judge.policy.max_retries >= 1  # a 429 or 5xx from the judge is retried, not the end of the phase
