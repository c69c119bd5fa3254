"""A replica killed mid-phase: the stage retries its in-flight rows and the phase output is still whole.

Deploys the tiny student as an hf engine (one replica), runs a teach-style ``run_stages`` over a
few hundred rows, kills the replica actor with ``ray.kill`` while rows are in flight, and checks
that every input row appears exactly once with the answer a fault-free engine gives it (sampling
is seeded per row, so a retried row must come back identical).
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from mmdc.config import EngineConfig, PipelineConfig, to_dict

pytestmark = pytest.mark.integration

APP = "faults"
ROWS = 1024  # long enough that the kill lands mid-phase: info() queues behind the clients' requests
SAMPLING = {"temperature": 0.5, "max_new_tokens": 16, "retries": 0}


def _replica(deployment: str) -> dict:
    """The live replica names itself (``HFEngine.info``: actor name and id, rows answered so far).

    (The state API, ``ray.util.state.list_actors``, needs the dashboard, which the test cluster runs without.)
    """
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=APP).info.remote().result(timeout_s=120)


def test_a_replica_killed_mid_phase_loses_and_repeats_no_row(ray_cluster, tmp_path, capfd, tiny_student,
                                                             colour_pool):
    import ray
    from ray import serve

    from mmdc.actors.engines import HFGenerator, build_engine_app, deployment_name
    from mmdc.data.pipelines import StageSpec, TeacherStage, image_url, row_seed, run_stages
    from mmdc.actors import roles

    student = tiny_student
    table = colour_pool(tmp_path, ROWS)
    engine = EngineConfig(replicas=1, num_cpus=1, max_batch_size=16, request_timeout_s=60,
                          max_retries=6, retry_backoff_s=0.5)
    serve.start(proxy_location="Disabled")
    serve.run(build_engine_app(engine, student), name=APP, route_prefix=None)
    dep = deployment_name(student)
    spec = StageSpec(TeacherStage, {"app_name": APP, "deployment": dep, "sampling": SAMPLING,
                                    "run_seed": 0, "image_root": str(tmp_path), "timeout_s": 60,
                                    "engine": to_dict(engine)})
    out_dir = tmp_path / "teach"
    result: dict = {}

    def phase():
        try:
            # 64-row batches sent as four 16-row requests each: the replica always has requests queued
            # (max_ongoing_requests=4), so the kill below cannot fall into a gap between requests.
            result["table"] = run_stages(table, [spec], out_dir, PipelineConfig(batch_size=64, concurrency=2,
                                                                                 blocks_per_client=2))
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            result["error"] = err

    try:
        worker = threading.Thread(target=phase)
        worker.start()
        deadline = time.monotonic() + 240
        while (first := _replica(dep))["answered"] < 48 and time.monotonic() < deadline:  # mid-phase
            time.sleep(0.2)
        assert first["answered"] < ROWS and worker.is_alive(), "the phase ended before the kill: use more rows"
        ray.kill(ray.get_actor(first["actor_name"], namespace="serve"), no_restart=True)
        worker.join(timeout=240)
        assert not worker.is_alive(), "the phase hung after the replica died"
        assert "error" not in result, result.get("error")
        assert _replica(dep)["actor_id"] != first["actor_id"]  # Serve replaced the replica, and the phase still finished
    finally:
        serve.delete(APP)
    # The stage saw the death and retried (the warning names the role and the rows); logs reach us asynchronously.
    logged = ""
    for _ in range(150):  # Ray forwards worker logs through its log monitor: slow on a busy machine
        logged += "".join(capfd.readouterr())
        if "teacher engine error on" in logged:
            break
        time.sleep(0.2)
    retried = set(re.findall(r"row\d{4}", " ".join(re.findall(r"teacher engine error on \d+ row\(s\) \[([^\]]*)\]", logged))))
    assert retried, logged[-3000:]

    got = result["table"].to_pandas().sort_values("instruction_id")
    assert got["instruction_id"].tolist() == table.column("instruction_id").to_pylist()  # each row exactly once

    # Retried rows carry the answers a fault-free engine gives (per-row seeds, batch-independent sampling).
    gen = HFGenerator(student, max_batch_size=16)
    sample = got[got["instruction_id"].isin(retried) | (got.index % 16 == 0)]
    reqs = [{"messages": roles.teacher_messages(q, image_url(img, str(tmp_path))), "seed": row_seed(0, "teacher", i),
             "temperature": SAMPLING["temperature"], "max_new_tokens": SAMPLING["max_new_tokens"]}
            for q, img, i in zip(sample["question"], sample["image"], sample["instruction_id"])]
    assert [o["text"] for o in gen.generate(reqs)] == sample["teacher_answer"].tolist()
