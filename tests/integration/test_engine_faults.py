"""A replica killed mid-phase: the stage retries its in-flight rows and the phase output is still whole.

Deploys the tiny student as an hf engine (one replica), runs a teach-style ``run_processors`` over a
few hundred rows, kills the replica actor with ``ray.kill`` while a request is in flight, and
checks that every input row appears exactly once with the answer a fault-free engine gives it
(sampling is seeded per row, so a retried row must come back identical).

The kill is not timed against the phase: the replica holds one request (its first after 48 rows
answered) until it is killed, and says which actor it is in a marker file, so the kill always
lands on rows in flight. (A replica works on one batch at a time, so ``HFEngine.info`` queues
behind the clients' requests and cannot tell the test when one is in flight.)

A replica that refuses its device (bf16 on a V100 its torch is told it has): the deploy fails with the
replica's one-line refusal, not with Serve's "failed to update the deployments".
"""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import pytest

from mmdc.config import EngineConfig, PipelineConfig, to_dict
from mmdc.engines.hf import HFEngine

pytestmark = pytest.mark.integration

APP = "faults"
ROWS = 512
SAMPLING = {"temperature": 0.5, "max_new_tokens": 16, "retries": 0}


class HeldEngine(HFEngine.func_or_class):
    """The hf engine, except that one request after ``hold_after`` rows waits in flight until the replica is killed."""

    def __init__(self, marker: str, hold_after: int, *args):
        super().__init__(*args)
        self.marker, self.hold_after = Path(marker), hold_after

    def generate_batch(self, requests: list[dict]) -> list[dict]:
        import ray

        if self.answered >= self.hold_after and not self.marker.exists():  # the replacement replica answers
            written = self.marker.with_name(self.marker.name + ".tmp")
            written.write_text(ray.get_runtime_context().get_actor_name())
            written.rename(self.marker)  # whole, or not there
            time.sleep(300)  # killed before this returns
        return super().generate_batch(requests)


def test_a_replica_killed_mid_phase_loses_and_repeats_no_row(ray_cluster, tmp_path, capfd, tiny_student, colour_pool):
    import ray
    from ray import cloudpickle, serve

    from mmdc import roles
    from mmdc.engines.backends import deployment_name
    from mmdc.engines.hf import HFGenerator
    from mmdc.engines.processors import ProcessorSpec, TeacherProcessor, image_url, run_processors
    from mmdc.roles import row_seed

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # replicas cannot import the test module
    student = tiny_student
    table = colour_pool(tmp_path, ROWS)
    engine = EngineConfig(
        replicas=1, num_cpus=1, max_batch_size=16, request_timeout_s=60, max_retries=6, retry_backoff_s=0.5
    )
    serve.start(proxy_location="Disabled")
    dep = deployment_name(student)
    marker = tmp_path / "held-replica"
    app = serve.deployment(HeldEngine).options(
        name=dep, num_replicas=1, max_ongoing_requests=1, ray_actor_options={"num_cpus": 1}
    )
    serve.run(app.bind(str(marker), 48, student, "float32", 16, 1), name=APP, route_prefix=None)
    spec = ProcessorSpec(
        TeacherProcessor,
        {
            "app_name": APP,
            "deployment": dep,
            "sampling": SAMPLING,
            "run_seed": 0,
            "image_root": str(tmp_path),
            "timeout_s": 60,
            "engine": to_dict(engine),
        },
    )
    out_dir = tmp_path / "teach"
    result: dict = {}

    def phase():
        try:
            result["table"] = run_processors(
                table, [spec], out_dir, PipelineConfig(batch_size=64, concurrency=2, blocks_per_client=2)
            )
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            result["error"] = err

    try:
        worker = threading.Thread(target=phase)
        worker.start()
        deadline = time.monotonic() + 240
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the replica never held a request"
        held = marker.read_text()
        ray.kill(ray.get_actor(held, namespace="serve"), no_restart=True)
        worker.join(timeout=240)
        assert not worker.is_alive(), "the phase hung after the replica died"
        assert "error" not in result, result.get("error")
        # Serve replaced the replica, and the phase still finished
        live = serve.get_deployment_handle(dep, app_name=APP).info.remote().result(timeout_s=120)
        assert live["actor_name"] != held
    finally:
        serve.delete(APP)
    # The stage saw the death and retried (the warning names the role and the rows); logs reach us asynchronously.
    logged = ""
    for _ in range(150):  # Ray forwards worker logs through its log monitor: slow on a busy machine
        logged += "".join(capfd.readouterr())
        if "teacher engine error on" in logged:
            break
        time.sleep(0.2)
    retried = set(
        re.findall(r"row\d{4}", " ".join(re.findall(r"teacher engine error on \d+ row\(s\) \[([^\]]*)\]", logged)))
    )
    assert retried, logged[-3000:]

    got = result["table"].to_pandas().sort_values("instruction_id")
    assert got["instruction_id"].tolist() == table.column("instruction_id").to_pylist()  # each row exactly once

    # Retried rows carry the answers a fault-free engine gives (per-row seeds, batch-independent sampling).
    gen = HFGenerator(student, max_batch_size=16)
    sample = got[got["instruction_id"].isin(retried) | (got.index % 16 == 0)]
    reqs = [
        {
            "messages": roles.teacher_messages(q, image_url(img, str(tmp_path))),
            "seed": row_seed(0, "teacher", i),
            "temperature": SAMPLING["temperature"],
            "max_new_tokens": SAMPLING["max_new_tokens"],
        }
        for q, img, i in zip(sample["question"], sample["image"], sample["instruction_id"])
    ]
    assert [o["text"] for o in gen.generate(reqs)] == sample["teacher_answer"].tolist()


class V100Engine(HFEngine.func_or_class):
    """The hf engine in a replica whose torch reports a V100 (compute capability 7.0): no GPU needed to be refused."""

    def __init__(self, *args):
        import torch

        torch.cuda.is_available = lambda: True
        torch.cuda.current_device = lambda: 0
        torch.cuda.get_device_name = lambda index=None: "Tesla V100-SXM2-32GB"
        torch.cuda.get_device_capability = lambda index=None: (7, 0)
        super().__init__(*args)


def test_an_engine_its_gpu_cannot_run_fails_at_deploy_with_its_one_line(ray_cluster, tiny_student):
    """bf16 on a V100: every replica start is refused before the model loads, so the deploy fails; Serve's own
    error says only that the deployment failed, and ``deploy_app`` raises the replica's line instead, whole."""
    from ray import cloudpickle, serve

    from mmdc.engines.backends import deploy_app, deployment_name
    from mmdc.engines.capability import EngineRefused

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    serve.start(proxy_location="Disabled")
    app = serve.deployment(V100Engine).options(
        name=deployment_name(tiny_student), num_replicas=1, ray_actor_options={"num_cpus": 1}
    )
    try:
        with pytest.raises(EngineRefused) as refused:
            deploy_app(app.bind(tiny_student, "bfloat16", 4, 1), "student")
    finally:
        serve.delete("student")
    assert str(refused.value) == (
        "engines.student.dtype=bfloat16 cannot run on GPU Tesla V100-SXM2-32GB (compute capability 7.0): bf16 "
        "needs compute capability >= 8.0; set engines.student.dtype=float16"
    )
