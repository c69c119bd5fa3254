"""mmdc/actors/resources.py: phases that cannot fit the cluster are reported, with numbers."""

from mmdc.actors.resources import check_fits, phase_needs
from mmdc.config import load_config


def test_assess_holds_teacher_and_student_engines():
    cfg = load_config(None, ["engines.teacher.num_gpus=2", "engines.teacher.replicas=2", "engines.student.num_gpus=1"])
    needs = phase_needs(cfg)
    assert needs["teach"]["GPU"] == 4
    assert needs["assess"]["GPU"] == 5


def test_fits_and_does_not_fit():
    cfg = load_config(None, ["tune.num_workers=2", "tune.cpus_per_worker=0.5", "align.num_workers=2",
                             "align.cpus_per_worker=0.5", "tune.micro_batch_size=4", "align.micro_batch_size=4"])
    assert check_fits(cfg, {"CPU": 2.0}) == []
    problems = check_fits(cfg, {"CPU": 1.0})
    assert any("phase 'assess' needs 2 CPU but the cluster has 1" in p for p in problems)


def test_disabled_stage_needs_nothing():
    cfg = load_config(None, ["align.enabled=false", "tune.gpus_per_worker=1", "tune.num_workers=2",
                             "tune.micro_batch_size=8"])
    needs = phase_needs(cfg)
    assert "align" not in needs
    assert check_fits(cfg, {"CPU": 4, "GPU": 1}) == ["phase 'tune' needs 2 GPU but the cluster has 1"]
