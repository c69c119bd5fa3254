"""``python -m mmdc.plan`` on the two paper presets, and on one config that cannot fit, recorded as markdown.

Run from the repository root (no GPU, no network, no Ray; about a minute):

    .venv/bin/python benchmarks/plan_paper.py          # writes benchmarks/results/plan_paper.md

Each case is the CLI run as a user runs it (its stdout, its stderr lines and its exit status); the summary
at the top is read off the same plans (``mmdc.sizing.check``), so it never disagrees with them.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "plan_paper.md"
CASES = [
    ("configs/paper.yaml", "configs/paper.yaml", ["--gpu", "v100-32gb", "--gpus", "6"]),
    ("configs/paper-a100.yaml", "configs/paper-a100.yaml", ["--gpu", "a100-80gb", "--gpus", "8"]),
    (
        "A config that cannot fit: ZeRO-2 for the full 7B tune on V100",
        "configs/paper.yaml",
        ["--gpu", "v100-32gb", "--gpus", "6", "--set", "tune.zero_stage=2"],
    ),
]


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "mmdc", "configs"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def summary(config: str, args: list[str]) -> str:
    """One bullet from the plan itself: fits or not, the tightest phase, the trainers' load / save, the cost."""
    from mmdc.config import load_config
    from mmdc.sizing import check
    from mmdc.sizing.memory import gib

    gpu, gpus = args[args.index("--gpu") + 1], int(args[args.index("--gpus") + 1])
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    plan = check(load_config(str(ROOT / config), sets), gpu, gpus)
    usable = plan.gpu.usable_bytes
    tight = min(plan.phases, key=lambda p: usable - p.per_gpu)
    hours = sum(p.seconds or 0 for p in plan.phases) / 3600
    gpu_hours = sum((p.seconds or 0) * p.gpus for p in plan.phases) / 3600

    def peaks(line: str) -> str:  # "at load 2.44 GiB (partitioned by zero.Init, mmdc/...)" -> "at load 2.44 GiB"
        return re.sub(r" \([^()]*\)", "", line).replace(";", ",")

    trainers = [
        f"{d.name} peaks at {gib(d.per_gpu)} GiB per GPU, "
        + ", ".join(peaks(line) for line in d.lines if line.startswith("at load"))
        for p in plan.phases
        if p.name in ("align", "tune")
        for d in p.deployments
    ]
    verdict = (
        "passes" if plan.ok else f"is refused ({len(plan.problems)} problem{'s' if len(plan.problems) > 1 else ''})"
    )
    return (
        f"- **`{config}`{' ' + ' '.join(f'--set {s}' for s in sets) if sets else ''} on {gpus} x {gpu} {verdict}**: "
        f"least headroom in {tight.name} ({gib(usable - tight.per_gpu)} GiB of {gib(usable)} usable); "
        + "; ".join(trainers)
        + f". Cost in the stated assumptions: ~{hours:,.0f} h wall, ~{gpu_hours:,.0f} GPU-hours."
        + (f" Refusal: {plan.problems[0]}" if plan.problems else "")
    )


def main() -> int:
    lines = [
        "# `python -m mmdc.plan` on the two paper presets",
        "",
        "Command: `.venv/bin/python benchmarks/plan_paper.py` (writes this file).",
        "",
        f"Recorded {time.strftime('%Y-%m-%d')} at commit `{commit()}` on a CPU machine (no GPU, no network, no Ray): "
        "the plan is arithmetic over the configs, the models' published config values (built on the meta device) "
        "and DeepSpeed's own ZeRO estimators. Nothing here is measured on a GPU; the throughput assumptions behind "
        'every wall time are printed under "Assumptions" and live in `mmdc/sizing/timing.py`. The trainers\' load '
        "and save peaks model the training code as it is now (issue 25): DeepSpeed workers load in the training "
        "dtype, ZeRO-3 partitions as it loads (`zero.Init`) and consolidates one module at a time onto rank 0 at the "
        "save; CPU measurements of both against these estimates: "
        "[`assembly_save_memory.md`](assembly_save_memory.md).",
        "",
        "## What it finds",
        "",
    ]
    lines += [summary(config, args) for _, config, args in CASES]
    for title, config, args in CASES:
        cmd = [sys.executable, "-m", "mmdc.plan", "--config", config, *args]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        shown = "python -m mmdc.plan --config " + config + " " + " ".join(args)
        lines += ["", f"## {title}", "", "```bash", shown, f"# exit status {done.returncode}", "```", ""]
        lines += ["stdout:", "", "```text", done.stdout.rstrip(), "```"]
        problems = [line for line in done.stderr.splitlines() if line.startswith("mmdc plan: ")]
        if problems:
            lines += ["", "stderr (one line per problem):", "", "```text", *problems, "```"]
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
