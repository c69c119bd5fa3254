"""Table 1's fine-tune without Ray: the train file as conversation rows, the training settings, the scoring, the CLI's
config and output checks (mmdc/eval/finetune.py, mmdc/eval/scienceqa.py ``load_train``, mmdc/finetune.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmdc import finetune as cli
from mmdc.config import ConfigError, FinetuneConfig, TrainConfig, dump_config, load_config
from mmdc.eval import finetune, scienceqa

ASSETS = Path(__file__).parents[2] / "assets" / "eval" / "scienceqa"
TRAIN = ASSETS / "llava_train_QCM-LEA.json"
TRAIN_IMAGES = ASSETS / "images" / "train"


def test_the_fixture_train_split_becomes_conversation_rows_with_text_only_ones():
    train = scienceqa.load_train(TRAIN, TRAIN_IMAGES)
    assert train.stats == {"rows": 8, "with_image": 4, "text_only": 4, "skipped": 0}
    first = train.rows[0]
    assert first["conversation_id"] == "11" and first["image"] == "11/image.png"
    assert first["questions"] == ["Which color is the square?\nContext: N/A\nOptions: (A) red (B) blue"]  # no <image>
    assert first["answers"][0].endswith("The answer is A.")
    assert all(row["image"] is None for row in train.rows if row["conversation_id"] in ("13", "14", "16", "18"))


def test_bad_train_records_are_skipped_with_their_reasons(tmp_path):
    good = json.loads(TRAIN.read_text())[0]
    records = [
        good,
        {"id": "x1", "conversations": [{"from": "human", "value": "q"}]},  # no answer
        {**good},  # repeated id
        {**good, "id": "x2", "image": "missing/image.png"},
        {"id": "x3", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
        {"id": "x4", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a <image>"}]},
        {"id": "x5", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        "not a record",
        {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    train = scienceqa.load_train(path, TRAIN_IMAGES)
    assert [row["conversation_id"] for row in train.rows] == ["11", "ok"]
    reasons = {skip["index"]: skip["reason"] for skip in train.skipped}
    assert set(reasons) == {1, 2, 3, 4, 5, 6, 7}
    assert "pairs" in reasons[1] and "duplicate id" in reasons[2] and "missing" in reasons[3]
    assert "names no 'image'" in reasons[4] and "an answer contains <image>" in reasons[5] and "empty" in reasons[6]
    assert all(skip["path"] == str(path) for skip in train.skipped)


def test_a_train_file_that_cannot_be_used_fails_naming_it(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"id": "1"}))
    with pytest.raises(ValueError, match="expected a JSON list"):
        scienceqa.load_train(path, tmp_path)
    path.write_text(json.dumps([{"id": "1"}]))
    with pytest.raises(ValueError, match="no usable train record"):
        scienceqa.load_train(path, tmp_path)


def test_training_settings_are_stage_2s_with_the_papers_epochs_and_lr():
    tune = TrainConfig(strategy="ddp", num_workers=3, epochs=2, lr=1e-3, precision="fp16", enabled=False)
    cfg = finetune.finetune_train_config(tune, FinetuneConfig())
    assert (cfg.epochs, cfg.lr, cfg.enabled) == (6, 2e-5, True)  # paper 4.1.3
    assert (cfg.strategy, cfg.num_workers, cfg.precision) == ("ddp", 3, "fp16")


def test_stale_keys_are_what_the_checkpoint_depends_on():
    changed = ["eval.scienceqa.finetune.lr", "eval.scienceqa.finetune.max_new_tokens", "eval.limit", "tune.zero_stage"]
    assert finetune.stale_finetune_keys(changed) == ["tune.zero_stage", "eval.scienceqa.finetune.lr"]
    assert finetune.stale_finetune_keys(["tune.cpus_per_worker", "eval.scienceqa.data"]) == []


class _Answers:
    """A generator that answers every question with one letter, and keeps the requests."""

    def __init__(self, reply: str) -> None:
        self.reply, self.requests = reply, []

    def generate(self, requests: list[dict]) -> list[dict]:
        self.requests += requests
        return [{"text": self.reply} for _ in requests]


def test_the_finetuned_student_is_scored_into_table_1_columns(tmp_path):
    cfg = load_config(
        None,
        [
            f"eval.scienceqa.data={ASSETS / 'llava_test_CQM-A.json'}",
            f"eval.scienceqa.problems={ASSETS / 'problems.json'}",
            f"eval.scienceqa.pid_splits={ASSETS / 'pid_splits.json'}",
        ],
    )
    generator = _Answers("The answer is A.")
    payload = finetune.evaluate_finetuned(cfg.eval, generator, tmp_path, model="/ckpt")
    assert (tmp_path / "finetuned.json").exists() and (tmp_path / "finetuned.samples.jsonl").exists()
    assert payload["columns"] == list(scienceqa.COLUMNS)
    assert payload["metrics"]["n"] == 4 and payload["metrics"]["Avg"] == 50.0  # pids 2 and 3 are A
    assert payload["meta"]["model"] == "/ckpt" and payload["meta"]["finetune"]["epochs"] == 6
    assert {r["max_new_tokens"] for r in generator.requests} == {1024}  # room for a QCM-LEA explanation
    assert {r["temperature"] for r in generator.requests} == {0.5}  # the paper's test temperature


def test_run_option_needs_its_files():
    with pytest.raises(ConfigError, match="finetune.data"):
        load_config(None, ["eval.scienceqa.finetune.enabled=true", "eval.scienceqa.data=test.json"])
    with pytest.raises(ConfigError, match="epochs >= 1"):
        load_config(None, ["eval.scienceqa.finetune.epochs=0"])
    cfg = load_config(
        None,
        [
            "eval.scienceqa.finetune.enabled=true",
            "eval.scienceqa.finetune.data=train.json",
            "eval.scienceqa.finetune.images=images/train",
            "eval.scienceqa.data=test.json",
        ],
    )
    assert cfg.eval.scienceqa.finetune == FinetuneConfig(enabled=True, data="train.json", images="images/train")


def _argv(*extra: str) -> list[str]:
    return ["--checkpoint", "ckpt", "--benchmark", "scienceqa", "--data", str(TRAIN), "--images", "imgs", *extra]


def test_cli_trains_for_the_papers_epochs_and_lr_unless_set():
    cfg = cli.load(cli.parse_args(_argv()))
    assert (cfg.eval.scienceqa.finetune.epochs, cfg.eval.scienceqa.finetune.lr) == (6, 2e-5)
    assert cfg.tune.strategy == "deepspeed" and cfg.tune.num_workers == 2  # configs/tiny.yaml's tune section
    assert cfg.eval.scienceqa.finetune.images == str(Path("imgs").resolve())  # absolute for Ray's workers
    cfg = cli.load(cli.parse_args(_argv("--set", "tune.epochs=1", "--set", "tune.lr=1e-3", "--max-new-tokens", "8")))
    assert (cfg.eval.scienceqa.finetune.epochs, cfg.eval.scienceqa.finetune.lr) == (1, 1e-3)
    assert cfg.eval.scienceqa.finetune.max_new_tokens == 8
    with pytest.raises(SystemExit):
        cli.parse_args(_argv("--problems", "problems.json"))  # scoring flags need --eval-data


def test_cli_continues_only_its_own_fine_tune(tmp_path):
    args = cli.parse_args(_argv())
    cfg = cli.load(args)
    out = tmp_path / "out"
    assert cli.refusal(out, cfg, "ckpt") is None  # new
    out.mkdir()
    (out / "other").write_text("x")
    assert "holds no earlier fine-tune" in cli.refusal(out, cfg, "ckpt")
    dump_config(cfg, out / cli.CONFIG_FILE)
    (out / cli.FINETUNE_FILE).write_text(json.dumps({"init_checkpoint": str(Path("ckpt").resolve())}))
    assert cli.refusal(out, cfg, "ckpt") is None  # the same fine-tune: continue it
    assert cli.refusal(out, cli.load(cli.parse_args(_argv("--max-new-tokens", "9"))), "ckpt") is None
    refused = cli.refusal(out, cli.load(cli.parse_args(_argv("--set", "tune.epochs=2"))), "other-ckpt")
    assert "eval.scienceqa.finetune.epochs" in refused and "--checkpoint" in refused
