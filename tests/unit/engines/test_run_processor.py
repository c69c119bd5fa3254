"""Stage objects live on in the worker process between Ray Data tasks (pipelines.run_processor)."""

from __future__ import annotations

import pandas as pd
import pytest

from mmdc.engines import processors as pipelines

BATCH = pd.DataFrame({"x": [1, 2]})


class CountingStage:
    """Records every construction; fails while its tag is in ``broken`` (a client pointing at a dead engine)."""

    made: list[dict] = []
    broken: set[str] = set()

    def __init__(self, **kwargs):
        CountingStage.made.append(kwargs)
        self.kwargs = kwargs

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.kwargs["tag"] in CountingStage.broken:
            raise RuntimeError("DeploymentUnavailableError")
        return batch.assign(tag=self.kwargs["tag"])


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(pipelines, "_PROCESSORS", {})
    CountingStage.made = []
    CountingStage.broken = set()


def test_same_kwargs_and_scope_reuse_one_stage_across_tasks():
    for _ in range(3):
        out = pipelines.run_processor(BATCH, CountingStage, {"tag": "a", "sampling": {"temperature": 0.5}}, "run-1")
    assert list(out["tag"]) == ["a", "a"]
    assert len(CountingStage.made) == 1


def test_other_kwargs_or_scope_get_their_own_stage_and_key_order_does_not_matter():
    pipelines.run_processor(BATCH, CountingStage, {"tag": "a", "seed": 1}, "s1")
    pipelines.run_processor(BATCH, CountingStage, {"seed": 1, "tag": "a"}, "s1")
    assert len(CountingStage.made) == 1
    pipelines.run_processor(BATCH, CountingStage, {"tag": "a", "seed": 2}, "s1")
    pipelines.run_processor(BATCH, CountingStage, {"tag": "a", "seed": 1}, "s2")  # another run
    assert len(CountingStage.made) == 3


def test_a_stage_that_fails_is_dropped_and_the_next_task_makes_a_new_one():
    pipelines.run_processor(BATCH, CountingStage, {"tag": "a"}, "s")
    CountingStage.broken = {"a"}
    with pytest.raises(RuntimeError):
        pipelines.run_processor(BATCH, CountingStage, {"tag": "a"}, "s")
    assert pipelines._PROCESSORS == {}
    CountingStage.broken = set()
    out = pipelines.run_processor(BATCH, CountingStage, {"tag": "a"}, "s")
    assert list(out["tag"]) == ["a", "a"]
    assert len(CountingStage.made) == 2


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(pipelines, "_MAX_PROCESSORS", 3)
    for i in range(7):
        pipelines.run_processor(BATCH, CountingStage, {"tag": str(i)}, "s")
    assert len(pipelines._PROCESSORS) <= 3
    pipelines.run_processor(BATCH, CountingStage, {"tag": "6"}, "s")
    assert len(CountingStage.made) == 7  # the newest survived the clear


def test_every_spec_has_its_own_scope_unless_given_one():
    assert pipelines.ProcessorSpec(CountingStage).scope != pipelines.ProcessorSpec(CountingStage).scope
    assert pipelines.ProcessorSpec(CountingStage, {}, scope="run-1").scope == "run-1"
