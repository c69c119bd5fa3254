"""The run's deployed engines (mmdc/actors/deployments.py) over ``openai`` engines, which deploy nothing on Serve:
a model is deployed once, a release frees every engine and is logged, clients are bound to what is served."""

from __future__ import annotations

from mmdc.actors.deployments import Deployments
from mmdc.actors.release import ClusterView
from mmdc.config import EngineConfig, SamplingConfig
from mmdc.engines.processors import TeacherProcessor

ENDPOINT = dict(backend="openai", base_url="http://127.0.0.1:9", model_name="m", replicas=0, num_cpus=0)


class FreeCluster:
    """A cluster whose resources are all back at the first look."""

    looks = 0

    def view(self) -> ClusterView:
        self.looks += 1
        return ClusterView(total={"CPU": 2.0}, available={"CPU": 2.0})

    def holders(self, view: ClusterView, free_bytes: int) -> list[str]:
        return []


def deployments() -> tuple[Deployments, list[dict], list[str], FreeCluster]:
    metrics: list[dict] = []
    said: list[str] = []
    probe = FreeCluster()
    engines = {"teacher": EngineConfig(**ENDPOINT), "student": EngineConfig(**ENDPOINT)}
    return Deployments(engines, 7, metrics.append, said.append, probe=probe), metrics, said, probe


def test_an_engine_is_deployed_once_per_model_and_every_deploy_is_logged():
    engines, metrics, said, _ = deployments()
    engines.deploy("student", "/ckpt/iter_1")
    engines.deploy("student", "/ckpt/iter_1")  # serves it already: nothing happens
    engines.deploy("student", "/ckpt/iter_2")
    assert engines.serving == {"student": "/ckpt/iter_2"}
    assert [(m["event"], m["model"]) for m in metrics] == [("deploy", "/ckpt/iter_1"), ("deploy", "/ckpt/iter_2")]
    assert said == ["deployed student: /ckpt/iter_1", "deployed student: /ckpt/iter_2"]


def test_release_frees_every_engine_once_and_waits_for_the_cluster():
    engines, metrics, _, probe = deployments()
    engines.release()  # nothing deployed: no wait, no record
    assert probe.looks == 0 and metrics == []
    engines.deploy("teacher", "/teacher")
    engines.deploy("student", "/student")
    engines.release()
    assert engines.serving == {} and probe.looks == 1
    assert metrics[-1]["event"] == "release"
    engines.deploy("student", "/student")  # after a release the same model is deployed again
    assert [m["event"] for m in metrics].count("deploy") == 3


def test_processors_and_generators_are_bound_to_the_model_served():
    engines, _, _, _ = deployments()
    spec = engines.processor(TeacherProcessor, "teacher", "/teacher", SamplingConfig(), "/images", note="x")
    assert engines.serving == {"teacher": "/teacher"}
    assert spec.kwargs["app_name"] == "teacher" and spec.kwargs["run_seed"] == 7
    assert spec.kwargs["image_root"] == "/images" and spec.kwargs["note"] == "x"
    assert spec.scope == engines.scope and engines.scope.startswith("run-")
    assert Deployments(engines.engines, 7, print, print).scope != engines.scope  # each run its own processes
    generator = engines.generator("student", "/student", role="judge")
    assert engines.serving == {"teacher": "/teacher", "student": "/student"} and generator.role == "judge"
