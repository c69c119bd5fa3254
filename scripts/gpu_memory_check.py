"""GPU check of stage 2 training: DeepSpeed fp16 ZeRO-2 to the end on one GPU, its checkpoint served, and the plan's
memory estimate for that job next to the measured peak. Run by ``scripts/gpu_check.sh`` before the whole iteration.

    python scripts/gpu_memory_check.py --out DIR            # on a CUDA machine
    python scripts/gpu_memory_check.py --out DIR --cpu      # the same path on the CPU (fp32, gloo): a dry run

Steps: build the tiny student (``MMDC_BUILD_DIR``), write 8 one-image conversations, train it with
``train_student`` (stage ``tune``, ``configs/tiny.yaml`` with DeepSpeed ZeRO-2, fp16, one worker on one GPU) to
its final save, deploy the checkpoint on an hf engine in fp16 (Ray Serve, half a GPU) and ask it one question, then
print ``mmdc.sizing``'s estimate for the tune worker (steady state, load, save) beside the worker's
``torch.cuda.max_memory_allocated`` (recorded in the metrics file by ``mmdc/train/worker.py``). Everything it
prints also goes to ``DIR/memory_check.json``. Exit status 0 when every step ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def overrides(cpu: bool, student: str) -> list[str]:
    """configs/tiny.yaml with the student checkpoint, a one-worker ZeRO-2 tune and a half-GPU fp16 student engine."""
    base = [
        "run.iterations=1",
        "models.teacher=tiny:random-teacher",
        f"models.student_init={student}",
        "tune.strategy=deepspeed",
        "tune.zero_stage=2",
        "tune.num_workers=1",
        "tune.micro_batch_size=2",
        "tune.global_batch_size=2",
        "tune.epochs=2",
        "tune.max_length=256",
        "tune.warmup_ratio=0.0",
        "tune.checkpoint_every_steps=0",
    ]
    if cpu:
        return base
    return [
        *base,
        "tune.gpus_per_worker=1",
        "tune.precision=fp16",
        "engines.student.num_gpus=0.5",
        "engines.student.dtype=float16",
        "engines.teacher.num_gpus=0.5",
        "engines.teacher.dtype=float16",
    ]


def conversations(root: Path) -> list[dict]:
    from PIL import Image, ImageDraw

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}
    rows = []
    for i, (name, rgb) in enumerate(colours.items()):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        ImageDraw.Draw(image).rectangle([12, 12, 52, 52], fill=rgb)
        image.save(root / f"img{i}.png")
        for copy in range(2):
            rows.append(
                {
                    "conversation_id": f"img{i}-{copy}",
                    "image_id": f"img{i}",
                    "image": str(root / f"img{i}.png"),
                    "questions": ["what color is the square?", "is there a square?"],
                    "answers": [f"the square is {name}.", "yes."],
                    "instruction_ids": [f"q{i}a-{copy}", f"q{i}b-{copy}"],
                }
            )
    return rows


def gpu_kind() -> str | None:
    """This machine's GPU as a plan kind, from its name and memory (None on a CPU or an unknown GPU)."""
    import torch

    from mmdc.sizing.gpus import GPUS, detect

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    labels = [g.ray_accelerator for g in GPUS.values() if g.ray_accelerator.upper() in props.name.upper()]
    if not labels:
        return None
    gpu, _, _ = detect({"GPU": 1.0, f"accelerator_type:{labels[0]}": 1.0}, lambda: props.total_memory // 2**20)
    return gpu.name if gpu else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the checkpoint, metrics and memory_check.json")
    p.add_argument("--cpu", action="store_true", help="run the same path on the CPU (fp32, gloo)")
    p.add_argument("--gpu", default=None, help="plan kind of this GPU (default: from its name and memory)")
    args = p.parse_args(argv)
    os.environ.setdefault("MMDC_BUILD_DIR", str(ROOT / ".mmdc_build"))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def say(key: str, value) -> None:
        report[key] = value
        print(f"[memory check] {key}: {value}", flush=True)
        (out / "memory_check.json").write_text(json.dumps(report, indent=1, default=str))

    import ray

    from mmdc.config import load_config
    from mmdc.sizing import check
    from mmdc.world.models import models_dir
    from mmdc.world.scenes import world_corpus
    from mmdc.world.tiny import ensure_tiny_models

    student = ensure_tiny_models(models_dir(), world_corpus(), seed=0)["student"]
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), overrides(args.cpu, student))
    kind = None if args.cpu else (args.gpu or gpu_kind())
    say("device", "cpu" if args.cpu else f"{kind or 'unknown GPU'}")

    # the plan's estimate for the tune worker of this very job
    plan = check(cfg, kind, 1 if kind else None)
    tune = next(d for phase in plan.phases if phase.name == "tune" for d in phase.deployments)
    say("plan_tune", tune.summary)
    say("plan_tune_memory", tune.memory.describe() if tune.memory else None)
    say("plan_tune_lines", tune.lines)
    say("plan_tune_peak_bytes", tune.per_gpu or (tune.memory.total if tune.memory else None))
    say("plan_problems", [str(problem) for problem in plan.problems])

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
    from mmdc.engines.backends import deployment_name
    from mmdc.eval.serve import ServeGenerator
    from mmdc.train.launcher import train_student

    data = out / "data"
    data.mkdir(exist_ok=True)
    start = time.perf_counter()
    result = train_student(
        stage="tune",
        init_checkpoint=student,
        output_dir=str(out / "student"),
        dataset=ray.data.from_items(conversations(data)),
        train_cfg=cfg.tune,
        seed=0,
        metrics_path=str(out / "metrics.jsonl"),
        run_name="memory-check",
    )
    say("train_wall_s", round(time.perf_counter() - start, 1))
    say("train", {k: result.metrics.get(k) for k in ("steps", "samples", "first_loss", "final_loss")})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["max_allocated"] for r in records if r.get("event") == "gpu_memory"]
    say("measured_max_allocated_bytes", peaks)
    if peaks and report["plan_tune_peak_bytes"]:
        say(
            "estimate_vs_measured_gib",
            f"plan {report['plan_tune_peak_bytes'] / 2**30:.3f} GiB (peak of steady, load, save; per GPU) vs "
            f"torch.cuda.max_memory_allocated {max(peaks) / 2**30:.3f} GiB",
        )

    # serve the checkpoint it saved, on the hf backend, and ask one question
    from mmdc.actors.handover import deploy_engine, release_engines
    from mmdc.data.images import to_data_url
    from mmdc.roles import student_messages

    engine = cfg.engines["student"]
    say("deploy_wall_s", round(deploy_engine("student", engine, result.checkpoint_dir), 1))
    generator = ServeGenerator("student", deployment_name(result.checkpoint_dir), engine, role="student")
    request = {
        "messages": student_messages("what color is the square?", to_data_url(data / "img0.png")),
        "temperature": 0.0,
        "seed": 0,
        "max_new_tokens": 8,
    }
    say("served_reply", generator.generate([request])[0])
    say("release_wall_s", round(release_engines({"student": engine}), 1))
    ray.shutdown()
    say("finished", time.strftime("%Y-%m-%d %H:%M:%S"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
