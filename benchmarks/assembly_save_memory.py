"""Peak memory of assembling a student and of a ZeRO-3 save on 2 gloo workers, against mmdc.sizing's estimates.

Builds the parts of a small LLaVA student locally (a CLIP vision tower stored in fp32, as openai's is, and a
Llama LM stored in fp16 with a 32,000-token vocabulary, as Vicuna is; ~160M parameters in all), then measures
on this machine's CPU, each in a fresh process, the resident high-water mark (``VmHWM``, reset before the
measured step where Linux allows):

1. assembly (``mmdc.actors.assembly.assemble_and_report``, what the driver's Ray task runs) in float16 and in
   float32, against ``mmdc.sizing.memory.assembly`` (the memory the task asks Ray for);
2. loading the student on 2 gloo workers under DeepSpeed ZeRO-3 (``load_student``), one training step, then
   the final save (``DeepSpeedStrategy.save``: consolidation one module at a time onto rank 0), against
   ``mmdc.sizing.memory.trainer``; and, for comparison, the save the strategy had before (every rank
   gathering every parameter at once).

Run from the repository root:

    .venv/bin/python benchmarks/assembly_save_memory.py              # writes benchmarks/results/assembly_save_memory.md
    .venv/bin/python benchmarks/assembly_save_memory.py --no-write   # print only

It takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "assembly_save_memory.md"
MIB = 1024**2
VOCAB = 32000
PRECISION = "bf16"  # DeepSpeed's CPU accelerator trains bf16 (not fp16); 2 bytes per weight, as fp16 on a V100


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------------------------------------------


def build_parts(root: Path, lm_hidden: int, lm_layers: int) -> tuple[Path, Path]:
    """A CLIP vision tower (fp32) and a Llama LM (fp16) with a tokenizer as long as its vocabulary."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from mmdc.world.tiny import train_tokenizer

    vision_dir, lm_dir = root / "vision", root / "lm"
    torch.manual_seed(0)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=8,
            image_size=224,
            patch_size=32,
        )
    )
    vision.save_pretrained(vision_dir)
    del vision
    tokenizer = train_tokenizer(["what color is the square?", "the square is red."], vocab_size=400)
    tokenizer.image_token = None
    tokenizer.add_tokens([f"<w{i}>" for i in range(VOCAB - len(tokenizer))])  # a Vicuna-sized vocabulary
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=lm_hidden,
            intermediate_size=lm_hidden * 8 // 3 // 64 * 64,
            num_hidden_layers=lm_layers,
            num_attention_heads=lm_hidden // 64,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).to(torch.float16)
    lm.save_pretrained(lm_dir)
    tokenizer.save_pretrained(lm_dir)
    return vision_dir, lm_dir


# --------------------------------------------------------------------------------------------------------------
# 1. Assembly (child process)
# --------------------------------------------------------------------------------------------------------------


def child_assemble(vision: str, lm: str, out: str, dtype: str) -> dict:
    import mmdc.train.assembly  # noqa: F401 - torch and transformers imported before the baseline, as in the task
    from mmdc.actors.assembly import assemble_and_report

    baseline = rss()
    report = assemble_and_report(vision, lm, out, projector="linear", dtype=dtype)
    return {"baseline": baseline, "peak": report.peak_rss, "seconds": report.seconds}


def measure_assembly(vision: Path, lm: Path, root: Path, dtype: str) -> dict:
    from mmdc.sizing import memory
    from mmdc.sizing.architectures import assemble

    out = root / f"student-{dtype}"
    cmd = [sys.executable, __file__, "--child-assemble", str(vision), str(lm), str(out), dtype]
    measured = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    arch = assemble(str(vision), str(lm), "linear", dtype=dtype)
    estimate = memory.assembly(arch, dtype)
    return {"dtype": dtype, "out": str(out), "params": arch.total, **measured, "estimate": estimate}


# --------------------------------------------------------------------------------------------------------------
# 2. ZeRO-3 load, step and save on 2 gloo workers (child processes)
# --------------------------------------------------------------------------------------------------------------


def _peak_since_reset() -> int:
    from mmdc.actors.assembly import peak_rss

    return peak_rss()


def _settle() -> int:
    """Resident memory after handing freed heap back to the OS (glibc keeps freed blocks resident, which would
    hide the next step's allocations in memory the previous step freed), the peak reset to it."""
    import ctypes
    import gc

    from mmdc.actors.assembly import reset_peak_rss

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    reset_peak_rss()
    return rss()


def zero3_worker(rank: int, world: int, port: int, checkpoint: str, out: str, old_save: bool, results: str) -> None:
    os.environ.update(
        {
            "DS_ACCELERATOR": "cpu",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch
    import torch.distributed as dist

    from mmdc.config import LoraConfig, TrainConfig
    from mmdc.train.strategies import DeepSpeedStrategy, save_hf
    from mmdc.train.worker import load_student, optimizer_and_schedule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = TrainConfig(
        strategy="deepspeed",
        zero_stage=3,
        num_workers=world,
        micro_batch_size=1,
        global_batch_size=world,
        precision=PRECISION,
        lr=1e-4,
        warmup_ratio=0.0,
        lr_schedule="constant",
    )
    import deepspeed  # noqa: F401 - imported before the baseline, as in a Ray Train worker

    row: dict = {"rank": rank, "baseline": _settle()}
    model, processor = load_student(checkpoint, "tune", cfg, grad_accum=1)
    row["load_peak"] = _peak_since_reset()
    optimizer, scheduler = optimizer_and_schedule(model, cfg, total_steps=1)
    strategy = DeepSpeedStrategy(model, optimizer, scheduler, cfg, accum=1, device=torch.device("cpu"))
    ids = torch.tensor([[1] + list(range(5, 37)) + [2]])
    strategy.micro_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, 1.0)
    strategy.step()
    dist.barrier()
    row["before_save"] = _settle()
    dist.barrier()
    if old_save:  # the strategy's save before issue 25: every rank gathers every parameter at once
        import deepspeed

        module = strategy.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                save_hf(module, processor, out, LoraConfig(), {})
    else:
        strategy.save(out, processor, LoraConfig(), rank=rank, summary={})
    dist.barrier()
    row["save_peak"] = _peak_since_reset()
    Path(results, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def measure_zero3(checkpoint: str, root: Path, old_save: bool) -> dict:
    import torch.multiprocessing as mp

    from mmdc.sizing import memory
    from mmdc.sizing.architectures import resolve

    results = Path(tempfile.mkdtemp(dir=root))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root / ("saved-old" if old_save else "saved")
    mp.start_processes(
        zero3_worker, args=(2, port, checkpoint, str(out), old_save, str(results)), nprocs=2, start_method="spawn"
    )
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    arch = resolve(checkpoint)
    tm = memory.trainer(
        arch,
        "tune",
        strategy="deepspeed",
        zero_stage=3,
        precision=PRECISION,
        workers=2,
        micro_batch=1,
        max_length=34,
        checkpointing=False,
    )
    from transformers import LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(out)  # the checkpoint loads
    return {"old_save": old_save, "ranks": ranks, "tm": tm, "params": arch.total, "largest": arch.largest_layer}


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def report(assembly: list[dict], zero3: list[dict], seconds: float, command: str) -> str:
    from mmdc.sizing.memory import CPU_PROCESS_RUNTIME_GIB, GIB

    runtime = int(CPU_PROCESS_RUNTIME_GIB * GIB)
    load = os.getloadavg()
    lines = [
        "# Peak memory of assembly and of a ZeRO-3 save, measured on CPU against the plan's estimates",
        "",
        f"Command: `{command}` ({seconds:.0f} s)",
        f"Machine: {platform.machine()}, nproc = {os.cpu_count()}, Python {platform.python_version()}; "
        f"load average at the end {load[0]:.2f} (1 min).",
        "",
        "Memory is the process's resident high-water mark (`VmHWM` in `/proc/self/status`), reset just before the "
        "measured step (`/proc/self/clear_refs` 5), so a figure is what that step peaked at, libraries included. "
        "Before the ZeRO-3 steps each worker first hands its freed heap back to the OS (`malloc_trim`), so the "
        "step's own allocations are not hidden in memory an earlier step freed but glibc kept resident. "
        "The estimates are `mmdc.sizing.memory`'s for the same model, as `python -m mmdc.plan` computes them; on a "
        f"CPU they add {mib(runtime)} MiB of process runtime (`CPU_PROCESS_RUNTIME_GIB`).",
        "",
        f"The parts: a CLIP vision tower (8 x 512, stored fp32) and a Llama LM (stored fp16, vocabulary {VOCAB:,}, "
        f"so `<image>` makes the embeddings grow as Vicuna's do); the student has {assembly[0]['params'] / 1e6:.1f}M "
        "parameters.",
        "",
        "## 1. Assembly (`mmdc.actors.assembly.assemble_and_report`, the driver's Ray task)",
        "",
        "| dtype | after imports MiB | peak MiB | peak - imports MiB | estimate MiB (what the task asks Ray for) "
        "| estimate without runtime MiB | peak / estimate | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in assembly:
        est = a["estimate"].total
        lines.append(
            f"| {a['dtype']} | {mib(a['baseline'])} | {mib(a['peak'])} | {mib(a['peak'] - a['baseline'])} | "
            f"{mib(est)} ({a['estimate'].describe()}) | {mib(est - runtime)} | {a['peak'] / est:.2f} | "
            f"{a['seconds']:.1f} |"
        )
    lines += [
        "",
        "## 2. ZeRO-3 on 2 gloo workers: load, one step, final save",
        "",
        f"`load_student` under ZeRO-3 ({PRECISION}: DeepSpeed's CPU accelerator has no fp16 optimizer), one "
        "optimizer step on a 34-token sample, then the save. Estimates: `memory.trainer(..., zero_stage=3, "
        f"precision={PRECISION}, workers=2)`; on a CPU the device is the host, so a rank's estimate is its device "
        "figure plus, on rank 0, the host copy (`save_host`, the consolidated weights), plus the process runtime.",
        "",
        "| save | rank | after imports MiB | load peak MiB | est. load MiB | before save MiB | save peak MiB "
        "| save peak - before MiB | est. save peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for z in zero3:
        tm = z["tm"]
        for r in z["ranks"]:
            host = tm.save_host if r["rank"] == 0 else 0  # rank 0 reads the checkpoint and holds the consolidation
            est_load, est_save = tm.load + host + runtime, tm.save + host + runtime
            lines.append(
                f"| {'before issue 25: all at once' if z['old_save'] else 'one module at a time'} | {r['rank']} | "
                f"{mib(r['baseline'])} | {mib(r['load_peak'])} | {mib(est_load)} | {mib(r['before_save'])} | "
                f"{mib(r['save_peak'])} | {mib(r['save_peak'] - r['before_save'])} | "
                + (f"{mib(est_save)} |" if not z["old_save"] else "- |")
            )
    z = zero3[0]
    lines += [
        "",
        f"The student: {z['params'] / 1e6:.1f}M parameters, {z['params'] * 2 / MIB:,.0f} MiB in 16 bits; its largest "
        f"module {z['largest'] / 1e6:.1f}M parameters ({z['largest'] * 2 / MIB:,.0f} MiB). Steady-state estimate per "
        f"rank: {z['tm'].steady.describe()}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-write", action="store_true", help="print the report instead of writing it")
    p.add_argument("--lm-hidden", type=int, default=768)
    p.add_argument("--lm-layers", type=int, default=12)
    p.add_argument("--child-assemble", nargs=4, metavar=("VISION", "LM", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_assemble:
        print(json.dumps(child_assemble(*args.child_assemble)))
        return 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vision, lm = build_parts(root, args.lm_hidden, args.lm_layers)
        assembly = [measure_assembly(vision, lm, root, dtype) for dtype in ("float16", "float32")]
        student = assembly[0]["out"]
        zero3 = [measure_zero3(student, root, old_save) for old_save in (False, True)]
    command = "python " + " ".join(
        [
            str(Path(__file__).relative_to(Path.cwd())) if Path(__file__).is_relative_to(Path.cwd()) else __file__,
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    text = report(assembly, zero3, time.perf_counter() - start, command.strip())
    if args.no_write:
        print(text)
    else:
        RESULTS.write_text(text)
        print(text)
        print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
