"""The openai backend for real: the project's own hf engine behind Serve's HTTP proxy on 127.0.0.1.

``python -m mmdc.endpoint`` (here ``serve_endpoint``) exposes a checkpoint as OpenAI-style
``/chat/completions``; a Ray Data teach stage configured with ``backend: openai`` then answers a
pool through it over HTTP. Sampling is seeded per row, so every answer must equal what the
checkpoint gives in one process: the HTTP path may not change a single token.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from mmdc.config import EngineConfig, PipelineConfig, to_dict

pytestmark = pytest.mark.integration
SAMPLING = {"temperature": 0.5, "max_new_tokens": 16, "retries": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_teach_stage_through_the_openai_backend_matches_the_checkpoint(
    ray_cluster, tmp_path, tiny_student, colour_pool
):
    from ray import serve

    from mmdc import roles
    from mmdc.endpoint import serve_endpoint
    from mmdc.engines.hf import HFGenerator
    from mmdc.engines.processors import ProcessorSpec, TeacherProcessor, image_url, run_processors
    from mmdc.roles import row_seed

    student = tiny_student
    table = colour_pool(tmp_path, 24)
    serve.shutdown()  # Serve's HTTP options are fixed when it starts: start it afresh with a proxy
    try:
        url = serve_endpoint(
            student,
            EngineConfig(replicas=1, num_cpus=1, max_batch_size=8, request_mode="row"),
            name="openai-test",
            port=_free_port(),
        )
        # A malformed body is refused with the endpoint's own message, not a crash.
        bad = urllib.request.Request(
            url + "/chat/completions",
            data=b'{"messages": []}',
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400 and "messages" in json.loads(refused.value.read())["error"]["message"]

        engine = EngineConfig(
            backend="openai",
            replicas=0,
            num_cpus=0,
            base_url=url,
            model_name="student",
            api_key_env=None,
            max_concurrency=4,
            request_timeout_s=120,
        )
        spec = ProcessorSpec(
            TeacherProcessor,
            {
                "app_name": "openai-test",
                "deployment": "",
                "sampling": SAMPLING,
                "run_seed": 0,
                "image_root": str(tmp_path),
                "timeout_s": 120,
                "engine": to_dict(engine),
            },
        )
        got = run_processors(
            table, [spec], tmp_path / "teach", PipelineConfig(batch_size=8, concurrency=1, blocks_per_client=3)
        )
    finally:
        serve.shutdown()
    got = got.to_pandas().sort_values("instruction_id")
    assert got["instruction_id"].tolist() == table.column("instruction_id").to_pylist()
    gen = HFGenerator(student, max_batch_size=8)
    reqs = [
        {
            "messages": roles.teacher_messages(q, image_url(img, str(tmp_path))),
            "seed": row_seed(0, "teacher", i),
            "temperature": SAMPLING["temperature"],
            "max_new_tokens": SAMPLING["max_new_tokens"],
        }
        for q, img, i in zip(got["question"], got["image"], got["instruction_id"])
    ]
    assert [o["text"] for o in gen.generate(reqs)] == got["teacher_answer"].tolist()
