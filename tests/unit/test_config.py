"""mmdc/config.py: presets parse, overrides apply, unknown keys and wrong types are errors naming the key."""

import dataclasses
from pathlib import Path

import pytest

from mmdc.config import Config, ConfigError, dump_config, grad_accumulation, load_config, parse_override, replace_fields

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_the_papers_values():
    cfg = Config()
    assert cfg.calibration.tau == 0.33
    assert cfg.run.iterations == 3
    assert cfg.align.lr == 2e-3 and cfg.tune.lr == 2e-5
    assert cfg.tune.global_batch_size == 16 and cfg.tune.warmup_ratio == 0.03
    assert cfg.roles.teacher.temperature == cfg.roles.referee.temperature == cfg.roles.augmentor.temperature == 0.5
    assert cfg.calibration.pool_update == "refresh"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_parse(preset):
    cfg = load_config(CONFIGS / preset)
    assert cfg.engines["teacher"].replicas >= 1


def test_overrides_apply_and_merge_engines():
    cfg = load_config(CONFIGS / "tiny.yaml", ["tune.lr=1e-3", "engines.teacher.replicas=2", "run.iterations=1"])
    assert cfg.tune.lr == pytest.approx(1e-3)
    assert cfg.engines["teacher"].replicas == 2
    assert cfg.engines["student"].num_cpus == 1.0  # untouched sibling kept
    assert cfg.run.iterations == 1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("tune.lrr=1", "unknown config key 'tune.lrr'"),
        ("engines.teacher.bogus=1", "unknown config key 'engines.teacher.bogus'"),
        ("tune.lr=abc", "'tune.lr' must be a number"),
        ("calibration.pool_update=sometimes", "'calibration.pool_update' must be one of"),
        ("run.iterations=1.5", "'run.iterations' must be an integer"),
        ("tune.global_batch_size=10", "tune.global_batch_size (10) must be a multiple"),
        ("calibration.tau=-0.1", "'calibration.tau' must be in [0, 1]"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_file_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  iterashuns: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'run.iterashuns'"):
        load_config(bad)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")


def test_dump_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["calibration.tau=0.5"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_grad_accumulation():
    cfg = load_config(None, ["tune.micro_batch_size=2", "tune.num_workers=2"])
    assert grad_accumulation(cfg.tune) == 4


def test_parse_override_yaml_values():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=true") == ("a", True)
    with pytest.raises(ConfigError):
        parse_override("novalue")


@dataclasses.dataclass(frozen=True)
class _Plan:
    steps: int
    lr: float = 1e-3
    mix: tuple[float, float] = (0.5, 0.5)


def test_replace_fields_parses_like_config_overrides():
    plan = replace_fields(_Plan(steps=3), ["lr=2e-5", "mix=[0.25, 0.75]"])
    assert plan == _Plan(steps=3, lr=2e-5, mix=(0.25, 0.75))
    with pytest.raises(ConfigError, match="unknown config key 'stpes' .*steps"):
        replace_fields(plan, ["stpes=1"])
    with pytest.raises(ConfigError, match="'mix' must be a list of 2 values"):
        replace_fields(plan, ["mix=0.5"])
    with pytest.raises(ConfigError, match=r"'mix\[1\]' must be a number"):
        replace_fields(plan, ["mix=[0.5, x]"])


def test_likelihood_referee_needs_an_hf_teacher_engine():
    cfg = load_config(None, ["calibration.referee_scoring=likelihood"])
    assert cfg.calibration.referee_scoring == "likelihood"
    with pytest.raises(
        ConfigError, match=r"calibration.referee_scoring: likelihood .*engines.teacher.backend is 'openai'"
    ):
        load_config(
            None,
            [
                "calibration.referee_scoring=likelihood",
                "engines.teacher.backend=openai",
                "engines.teacher.base_url=http://127.0.0.1:9/v1",
                "engines.teacher.model_name=judge",
                "engines.teacher.replicas=0",
            ],
        )
    with pytest.raises(ConfigError, match="referee_scoring"):
        load_config(None, ["calibration.referee_scoring=votes"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("calibration.tau=nan", "'calibration.tau' must be a finite number"),
        ("calibration.tau=1.5", "'calibration.tau' must be in [0, 1]"),
        ("tune.lr=.inf", "'tune.lr' must be a finite number"),
        ("engines.student.request_timeout_s=.nan", "'engines.student.request_timeout_s' must be a finite number"),
        ("pipeline.batch_size=0", "'pipeline.batch_size' must be >= 1"),
        ("pipeline.concurrency=0", "'pipeline.concurrency' must be >= 1"),
        ("tune.num_workers=0", "'tune.num_workers' must be >= 1"),
        ("tune.micro_batch_size=0", "'tune.micro_batch_size' must be >= 1"),
        ("align.global_batch_size=0", "'align.global_batch_size' must be >= 1"),
        ("data.max_instructions=-1", "'data.max_instructions' must be >= 1"),
        ("data.max_instructions=0", "'data.max_instructions' must be >= 1"),
        ("data.max_image_pixels=0", "'data.max_image_pixels' must be >= 1"),
        ("data.max_skip_ratio=1.5", "'data.max_skip_ratio' must be in [0, 1]"),
        ("roles.referee.max_new_tokens=0", "'roles.referee.max_new_tokens' must be >= 1"),
        ("roles.teacher.temperature=-1", "'roles.teacher.temperature' must be >= 0"),
        ("engines.teacher.num_cpus=-1", "'engines.teacher.num_cpus' must be >= 0"),
        ("engines.teacher.num_gpus=-0.5", "'engines.teacher.num_gpus' must be >= 0"),
        ("tune.epochs=0", "'tune.epochs' must be >= 1"),
        ("tune.warmup_ratio=2", "'tune.warmup_ratio' must be in [0, 1]"),
        ("tune.lora.dropout=1", "'tune.lora.dropout' must be in [0, 1)"),
        ("data.world.num_images=0", "'data.world.num_images' must be >= 1"),
        ("data.caption_filter.min_count=0", "'data.caption_filter.min_count' must be >= 1"),
        ("eval.temperature=-0.1", "'eval.temperature' must be >= 0"),
        ("run.seed=-1", "'run.seed' must be >= 0"),
    ],
)
def test_every_value_is_range_checked_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_range_rules_name_real_keys():
    from mmdc.config import _RANGES, _sections

    for path, rules in _RANGES.items():
        for _, section in _sections(Config(), path):
            assert set(rules) <= {f.name for f in dataclasses.fields(section)}, path


def test_input_files_must_exist_naming_each_missing_key(tmp_path):
    from mmdc.config import check_inputs

    check_inputs(load_config(None, []))  # the world: nothing to find
    (tmp_path / "i.json").write_text("[]")
    (tmp_path / "coco").mkdir()
    base = ["data.source=llava", f"data.instructions={tmp_path / 'i.json'}", f"data.image_folder={tmp_path / 'coco'}"]
    check_inputs(load_config(None, [*base, "align.enabled=false"]))
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(None, [*base, f"data.captions={tmp_path / 'c.json'}"]))
    assert str(err.value) == f"data.captions: {tmp_path / 'c.json'} is not there (no such file)"
    with pytest.raises(ConfigError) as err:
        check_inputs(load_config(None, ["data.source=llava", f"data.instructions={tmp_path}", "align.enabled=false"]))
    assert str(err.value) == f"data.instructions: {tmp_path} is not a file; data.image_folder is not set"
    with pytest.raises(ConfigError, match="eval.scienceqa.data: .*no such file.*eval.scienceqa.problems"):
        check_inputs(
            load_config(
                None,
                [
                    *base,
                    "align.enabled=false",
                    "eval.benchmarks=[scienceqa]",
                    f"eval.scienceqa.data={tmp_path / 'sqa.json'}",
                    f"eval.scienceqa.problems={tmp_path / 'p.json'}",
                ],
            )
        )


def test_random_fractions_per_iteration_and_old_configs_keep_one_share():
    cal = load_config(None, []).calibration
    assert cal.random_fractions is None and cal.parent_share(1) == cal.parent_share(3) == cal.random_fraction
    cal = load_config(None, ["calibration.selection=random", "calibration.random_fractions=[0.8, 0.25, 0]"]).calibration
    assert [cal.parent_share(k) for k in (1, 2, 3, 4)] == [0.8, 0.25, 0.0, 0.0]  # the last share repeats
    for bad in ("[]", "[0.5, 1.5]", "[.nan]", "0.5"):
        with pytest.raises(ConfigError, match="random_fractions"):
            load_config(None, [f"calibration.random_fractions={bad}"])
