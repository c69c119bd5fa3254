"""Both referee scorings through a served world teacher, as the assess phase runs them.

``calibration.referee_scoring: reply`` sends the Table 6 referee prompt and reads the scores from the
text; ``likelihood`` sends score requests under the Table 6 teacher prompt and writes the replies
itself. Both go through Ray Data and a real hf Serve engine holding the short world teacher (the CI
build), on count questions, the family that teacher knows best (92% of pairs, teacher-forced:
benchmarks/research/teacher_knowledge.py), with half the "student" answers right and half plausibly wrong.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

from mmdc.config import EngineConfig, PipelineConfig, to_dict

ROWS = 16
SAMPLING = {"temperature": 0.5, "max_new_tokens": 24, "retries": 1}


def count_pool(image_dir: Path) -> tuple[pa.Table, list[bool]]:
    """Count questions about rendered scenes; the teacher's answer is the truth, the student's right on even rows."""
    from mmdc.world import scenes as world
    from mmdc.world import teacher as wt

    rng = random.Random("referee-scoring-test")
    rows, right = [], []
    for k in range(ROWS):
        scene = world.random_scene(f"scene{k:02d}", rng)
        world.render(scene).save(image_dir / f"{scene.image_id}.png")
        question, spec = world.random_question(scene, "count", rng)
        truth = world.answer(scene, spec)
        wrong, kind = wt.wrong_answer(scene, spec, rng)
        while kind == "garbled":  # told apart by its surface, not its facts: not a test of judgement
            wrong, kind = wt.wrong_answer(scene, spec, rng)
        rows.append(
            {
                "instruction_id": f"row{k:02d}",
                "image_id": scene.image_id,
                "image": f"{scene.image_id}.png",
                "question": question,
                "teacher_answer": truth,
                "student_answer": truth if k % 2 == 0 else wrong,
            }
        )
        right.append(k % 2 == 0)
    return pa.Table.from_pylist(rows), right


def test_reply_and_likelihood_referees_through_a_served_world_teacher(ray_cluster, tmp_path):
    from ray import serve

    from mmdc import roles
    from mmdc.data.calibration import LIKELIHOOD_EXPLANATION, assess_table
    from mmdc.engines.backends import build_engine_app, deployment_name
    from mmdc.engines.processors import ProcessorSpec, RefereeProcessor, run_processors
    from mmdc.world.models import models_dir
    from mmdc.world.teacher import ensure_world_teacher

    teacher = ensure_world_teacher(models_dir(), schedule="short", seed=0)
    table, right = count_pool(tmp_path)
    engine = EngineConfig(replicas=1, num_cpus=1, max_batch_size=16, request_timeout_s=120)
    serve.start(proxy_location="Disabled")
    serve.run(build_engine_app(engine, teacher), name="referee-test", route_prefix=None)
    try:
        assessed = {}
        for scoring in ("reply", "likelihood"):
            spec = ProcessorSpec(
                RefereeProcessor,
                {
                    "app_name": "referee-test",
                    "deployment": deployment_name(teacher),
                    "sampling": SAMPLING,
                    "run_seed": 0,
                    "image_root": str(tmp_path),
                    "engine": to_dict(engine),
                    "scoring": scoring,
                },
            )
            out = run_processors(table, [spec], tmp_path / scoring, PipelineConfig(batch_size=8, concurrency=1))
            assessed[scoring] = assess_table(out.to_pandas().sort_values("instruction_id"), tau=0.33)
    finally:
        serve.delete("referee-test")

    reply, likely = assessed["reply"], assessed["likelihood"]
    assert reply["unscored_reason"].isna().all()  # the world teacher's Table 6 replies parse
    assert not any(LIKELIHOOD_EXPLANATION in r for rs in reply["referee_replies"] for r in rs)
    assert likely["unscored_reason"].isna().all()
    assert all(len(rs) == 2 and LIKELIHOOD_EXPLANATION in rs[0] for rs in likely["referee_replies"])
    for teacher_first, student_first in likely["referee_replies"]:  # "[A0] ..." and "[B0] ...": mirror images
        scores = roles.parse_referee(teacher_first.split("] ", 1)[1])
        assert roles.parse_referee(student_first.split("] ", 1)[1]) == scores[::-1]
    # Identical answers score identically; a wrong count scores lower, so its instruction is hard more often.
    same = likely[right]
    assert (same["score_student"] == same["score_teacher"]).all()
    wrong = likely[[not r for r in right]]
    assert (wrong["score_student"] < wrong["score_teacher"]).mean() >= 0.75
    assert wrong["hard"].astype(bool).mean() > same["hard"].astype(bool).mean()
