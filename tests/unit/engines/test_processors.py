"""mmdc/engines/processors.py without Ray: the backend comes from the engine config, faults are retried.

One test drives a TeacherProcessor over real HTTP (backend openai, a stdlib server on 127.0.0.1); the
others swap in a scripted client to check that retried rows land once and in order.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
from PIL import Image
from ray import exceptions as rex

from mmdc.engines.processors import AugmentorProcessor, RefereeProcessor, TeacherProcessor
from mmdc.engines.protocol import EngineError

OPENAI = {
    "backend": "openai",
    "base_url": "http://127.0.0.1:9/v1",
    "model_name": "judge",
    "replicas": 0,
    "num_cpus": 0,
    "retry_backoff_s": 0.0,
}
SAMPLING = {"temperature": 0.5, "max_new_tokens": 8, "retries": 0}


@pytest.fixture
def batch(tmp_path) -> pd.DataFrame:
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "red.png")
    return pd.DataFrame(
        {
            "instruction_id": [f"i{k}" for k in range(5)],
            "image": ["red.png"] * 5,
            "question": [f"question {k}?" for k in range(5)],
        }
    )


@pytest.fixture
def endpoint():
    """A chat-completions server whose reply repeats the question it was asked; the 2nd request gets a 503."""
    seen = []
    lock = threading.Lock()  # requests arrive on several threads at once

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:  # which request this is, decided once: counting later could see a third one arrive
                seen.append(body)
                n = len(seen)
            text = body["messages"][-1]["content"][-1]["text"]
            status, payload = (
                200,
                {
                    "choices": [{"message": {"content": "re: " + text.splitlines()[-1]}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 3},
                },
            )
            if n == 2:
                status, payload = 503, {"error": {"message": "overloaded"}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_teacher_stage_over_an_openai_endpoint(batch, tmp_path, endpoint):
    url, seen = endpoint
    stage = TeacherProcessor(
        "teacher", "unused", SAMPLING, run_seed=0, image_root=str(tmp_path), engine={**OPENAI, "base_url": url}
    )
    out = stage(batch)
    assert out["teacher_answer"].tolist() == [f"re: question {k}?" for k in range(5)]
    assert out["teacher_tokens"].tolist() == [3] * 5
    assert len(seen) == 6  # five rows, one of them twice (the 503)
    first = seen[0]["messages"][-1]["content"][0]
    assert first["type"] == "image_url" and first["image_url"]["url"].startswith("data:image/png;base64,")


class FlakyClient:
    """Answers every row, except that the first call loses the rows named in ``lose`` to a dead replica."""

    def __init__(self, lose: set[int]):
        self.lose, self.calls = lose, []

    def generate(self, requests):
        self.calls.append(len(requests))
        outs = []
        for r in requests:
            text = r["messages"][-1]["content"][-1]["text"]
            if len(self.calls) == 1 and any(f"question {k}?" in text for k in self.lose):
                outs.append(rex.ActorDiedError())
            else:
                outs.append(
                    {
                        "text": "Assistant 1: 7 Assistant 2: 3",
                        "prompt_tokens": 1,
                        "completion_tokens": 5,
                        "finish_reason": "stop",
                    }
                )
        return outs


def test_referee_rows_lost_to_a_dead_replica_come_back_once(batch, tmp_path):
    batch = batch.assign(teacher_answer="t", student_answer="s")
    stage = RefereeProcessor("teacher", "unused", SAMPLING, run_seed=0, image_root=str(tmp_path), engine=OPENAI)
    stage.client = FlakyClient(lose={1, 3})
    out = stage(batch)
    assert stage.client.calls == [10, 4]  # 5 rows x 2 orders, then the 2 lost rows x 2 orders
    assert out["instruction_id"].tolist() == batch["instruction_id"].tolist()
    assert all(len(r) == 2 for r in out["referee_replies"])  # one reply per order, no duplicates
    assert (out["reply_teacher_first"] == "Assistant 1: 7 Assistant 2: 3").all()


def test_a_stage_gives_up_with_the_role_and_rows(batch, tmp_path):
    stage = TeacherProcessor(
        "teacher", "unused", SAMPLING, run_seed=0, image_root=str(tmp_path), engine={**OPENAI, "max_retries": 1}
    )

    class Dead:
        def generate(self, requests):
            raise rex.ActorDiedError()

    stage.client = Dead()
    with pytest.raises(EngineError, match=r"teacher engine failed on 5 row\(s\) \[i0, i1, i2, i3, i4\] after 2"):
        stage(batch)


class LikelihoodClient:
    """Scores each reply by its text: "right" answers are likely, anything else is not."""

    def __init__(self):
        self.requests = []

    def generate(self, requests):
        self.requests.extend(requests)
        return [
            {
                "text": "",
                "logprob": -0.1 * 4 if r["score_reply"] == "right" else -2.0 * 4,
                "scored_tokens": 4,
                "prompt_tokens": 9,
                "completion_tokens": 0,
                "finish_reason": "score",
            }
            for r in requests
        ]


def test_likelihood_referee_scores_answers_under_the_teacher_prompt(batch, tmp_path):
    from mmdc import roles
    from mmdc.data.calibration import assess_table

    batch = batch.assign(teacher_answer="right", student_answer=["right", "wrong", "right", "wrong", "wrong"])
    stage = RefereeProcessor(
        "teacher", "unused", SAMPLING, run_seed=0, image_root=str(tmp_path), engine=OPENAI, scoring="likelihood"
    )
    stage.client = LikelihoodClient()
    out = stage(batch)
    sent = stage.client.requests
    assert len(sent) == 10 and [r["score_reply"] for r in sent[:4]] == ["right", "right", "right", "wrong"]
    teacher_prompt = roles.teacher_messages("question 1?", stage.url("red.png"))
    assert sent[2]["messages"] == sent[3]["messages"] == teacher_prompt  # the teacher's Table 6 prompt, no referee's
    assert [roles.parse_referee(r) for r in out["reply_teacher_first"][:2]] == [(9.14, 9.14), (9.14, 2.22)]
    assert roles.parse_referee(out["reply_student_first"][1]) == (2.22, 9.14)
    assessed = assess_table(out.assign(image_id="img"), tau=0.33)
    assert assessed["hard"].tolist() == [False, True, False, True, True]
    assert all(len(r) == 2 for r in assessed["referee_replies"])


def test_referee_scoring_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="'reply' or 'likelihood'"):
        RefereeProcessor("teacher", "unused", SAMPLING, run_seed=0, engine=OPENAI, scoring="votes")


class SeedClient:
    """Records every request and answers each with a one-sentence question (a valid augmentor reply)."""

    def __init__(self):
        self.requests: list[dict] = []

    def generate(self, requests):
        self.requests += requests
        return [{"text": "Is there a blue circle?", "completion_tokens": 5, "finish_reason": "stop"} for _ in requests]


def _seeds(cls, batch, tmp_path, **kwargs) -> list[int]:
    stage = cls("teacher", "unused", SAMPLING, run_seed=0, image_root=str(tmp_path), engine=OPENAI, **kwargs)
    stage.client = SeedClient()
    stage(batch)
    return [r["seed"] for r in stage.client.requests]


def test_a_still_hard_parent_gets_a_fresh_augmentor_seed_in_every_iteration(batch, tmp_path):
    first, second = (_seeds(AugmentorProcessor, batch, tmp_path, iteration=k) for k in (1, 2))
    assert len(first) == len(second) == len(batch)
    assert all(a != b for a, b in zip(first, second))  # the same parent, another sample
    assert first == _seeds(AugmentorProcessor, batch, tmp_path, iteration=1)  # a resumed phase asks the same


def test_teacher_and_referee_seeds_do_not_depend_on_the_iteration(batch, tmp_path):
    from mmdc import roles

    teacher = _seeds(TeacherProcessor, batch, tmp_path)
    assert teacher == [roles.row_seed(0, "teacher", f"i{k}") for k in range(5)]  # the answer store's key holds
    assert roles.row_seed(0, "teacher", "i0") == roles.row_seed(0, "teacher", "i0", 0, None)
    scored = batch.assign(teacher_answer="a", student_answer="b")
    referee = _seeds(RefereeProcessor, scored, tmp_path)
    assert referee[:2] == [roles.row_seed(0, "referee", "i0:A"), roles.row_seed(0, "referee", "i0:B")]
