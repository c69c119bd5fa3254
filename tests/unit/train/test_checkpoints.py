"""Resumable training state without Ray: where it lives, what it must match, and which config changes make it stale."""

from __future__ import annotations

import json

import pytest

from mmdc.config import TrainConfig
from mmdc.train.checkpoints import (
    STATE_MARKER,
    prepare_state,
    read_train_state,
    resume_fingerprint,
    resume_mismatch,
    stale_training_keys,
    train_state_dir,
)


def test_train_state_lives_beside_the_output_dir(tmp_path):
    assert (
        train_state_dir(tmp_path / "checkpoints" / "student" / "iter_1")
        == (tmp_path / "checkpoints" / "student" / "iter_1.train_state").resolve()
    )
    assert read_train_state(tmp_path / "out") is None


def _fingerprint(**train) -> dict:
    return resume_fingerprint("tune", "/ckpt/iter_0", 1, 64, 4, TrainConfig(**train))


def test_fingerprint_ignores_what_does_not_change_the_saved_state():
    base = _fingerprint()
    assert resume_mismatch(base, _fingerprint(checkpoint_every_steps=7, cpus_per_worker=2.0, gpus_per_worker=1.0)) == []
    assert resume_mismatch(base, _fingerprint(num_workers=4)) == ["train.num_workers: 2 -> 4"]
    lora = _fingerprint()
    lora["train.lora"]["target_modules"] = ("q_proj", "k_proj", "v_proj", "o_proj")  # tuple vs saved JSON list
    assert resume_mismatch(json.loads(json.dumps(base)), lora) == []


def _write_state(root, fingerprint: dict, step: int = 3) -> None:
    (root / "step_00000003").mkdir(parents=True)
    (root / STATE_MARKER).write_text(json.dumps({"tag": "step_00000003", "step": step, "fingerprint": fingerprint}))


def test_prepare_state_resumes_refuses_or_starts_over(tmp_path):
    root = tmp_path / "out.train_state"
    fp = _fingerprint()
    assert prepare_state(root, fp, resume=True) == 0  # nothing saved: fresh start
    _write_state(root, fp)
    assert prepare_state(root, fp, resume=True) == 3
    with pytest.raises(ValueError, match=r"different setup \(train.zero_stage: 2 -> 3\)"):
        prepare_state(root, _fingerprint(zero_stage=3), resume=True)
    assert prepare_state(root, _fingerprint(zero_stage=3), resume=False) == 0
    assert not root.exists()  # resume=False drops the old state


def test_prepare_state_drops_a_state_without_marker(tmp_path):
    root = tmp_path / "out.train_state"
    (root / "step_00000002").mkdir(parents=True)  # crashed during its first save: never completed
    assert prepare_state(root, _fingerprint(), resume=True) == 0
    assert not root.exists()


def test_forced_changes_that_touch_training_restart_it():
    changed = ["tune.lr", "align.epochs", "models.student_init", "data.path", "run.seed"]
    assert stale_training_keys(changed) == changed


def test_forced_changes_elsewhere_keep_the_saved_training_state():
    assert (
        stale_training_keys(["eval.benchmarks", "pipeline.batch_size", "run.iterations", "engines.teacher.replicas"])
        == []
    )
    assert stale_training_keys([]) == []


def test_resources_and_checkpoint_cadence_may_change_without_restarting_training():
    assert stale_training_keys(["tune.cpus_per_worker", "align.checkpoint_every_steps", "tune.lr"]) == ["tune.lr"]
