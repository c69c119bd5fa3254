"""Pure helpers of the Driver actor (no Ray cluster needed: importing the module does not start one)."""

from mmdc.actors.driver import training_keys


def test_forced_changes_that_touch_training_restart_it():
    changed = ["tune.lr", "align.epochs", "models.student_init", "data.path", "run.seed"]
    assert training_keys(changed) == changed


def test_forced_changes_elsewhere_keep_the_saved_training_state():
    assert training_keys(["eval.benchmarks", "pipeline.batch_size", "run.iterations", "engines.teacher.replicas"]) == []
    assert training_keys([]) == []


def test_resources_and_checkpoint_cadence_may_change_without_restarting_training():
    assert training_keys(["tune.cpus_per_worker", "align.checkpoint_every_steps", "tune.lr"]) == ["tune.lr"]
