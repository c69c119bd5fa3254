"""``python -m mmdc.plan``: what a run needs and costs, per phase, before anything starts.

    python -m mmdc.plan --config configs/paper.yaml --gpu v100-32gb --gpus 6
    python -m mmdc.plan --config configs/paper.yaml --gpu v100-32gb --gpus 6 --set tune.zero_stage=2
    python -m mmdc.plan --config configs/tiny.yaml            # a CPU config: host RAM per phase
    python -m mmdc.plan --config my.yaml --gpu a100-80gb --model-config my-org/my-llava=/models/my-llava

Reads the config as ``mmdc.run`` does (``--set`` included), sizes the models from their published or
local configs on the meta device (no download, no GPU, no Ray) and prints, per phase, the models,
the deployments and trainer workers with their GPUs, the memory per GPU and whether it fits, and a
wall-time estimate from the throughput assumptions it states. Exit status 2, with one line per
problem naming the phase, the config key to change and the alternatives, when something cannot fit
or run. The arithmetic is ``mmdc.sizing``. ``preflight`` is the same check as ``mmdc.run`` runs it before it starts
anything (``--gpu`` / ``--gpus`` / ``--dry-run``, or the GPU kind of the Ray cluster it joined).
"""

from __future__ import annotations

import argparse
import sys

from mmdc.config import add_config_arguments, config_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mmdc.sizing.gpus import GPUS

    p = argparse.ArgumentParser(
        prog="python -m mmdc.plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, example="tune.zero_stage=2")
    p.add_argument(
        "--gpu",
        default=None,
        metavar="KIND",
        help=f"GPU kind: {', '.join(GPUS)} (default: none, for a config that asks for no GPUs)",
    )
    p.add_argument("--gpus", type=int, default=None, help="GPUs in the cluster (default: the largest phase's need)")
    p.add_argument(
        "--model-config",
        dest="model_configs",
        action="append",
        default=[],
        metavar="ID=PATH",
        help="config.json (or a folder with one) for a model id the plan cannot size offline (repeatable)",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="instructions in D_sin for the time estimate (default: data.max_instructions, else the "
        "paper's 220K or the synthetic world's size)",
    )
    p.add_argument("--captions", type=int, default=None, help="stage 1 caption pairs (default: LLaVA-Pretrain's 558K)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from mmdc.config import ConfigError, load_config
    from mmdc.sizing import check

    config = config_file(args.config)
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as err:
        print(f"mmdc plan: config error: {err}", file=sys.stderr)
        return 2
    model_configs = {}
    for item in args.model_configs:
        model_id, sep, path = item.partition("=")
        if not sep or not model_id or not path:
            print(f"mmdc plan: --model-config {item!r} must look like ID=PATH", file=sys.stderr)
            return 2
        model_configs[model_id] = path
    try:
        plan = check(
            cfg,
            args.gpu,
            args.gpus,
            model_configs=model_configs,
            rows=args.rows,
            captions=args.captions,
            config_name=config or "the built-in defaults",
        )
    except ValueError as err:  # an unknown --gpu kind
        print(f"mmdc plan: {err}", file=sys.stderr)
        return 2
    print(plan.render(problems=False), flush=True)
    for problem in plan.problems:
        print(f"mmdc plan: {problem}", file=sys.stderr)
    return 2 if plan.problems else 0


if __name__ == "__main__":
    sys.exit(main())


def cluster_gpus() -> tuple[str | None, int, str]:
    """The connected Ray cluster's GPU kind (a ``--gpu`` name or None), its GPUs now, and how that was decided.

    From ``ray.cluster_resources()``: ``GPU`` and ``accelerator_type:*``. A label several kinds share
    (``V100``) is settled by one GPU's total memory, read on a GPU node (``mmdc.actors.release``).
    """
    import ray

    from mmdc.sizing.gpus import detect

    def memory_mib() -> int | None:
        from mmdc.actors.release import read_gpu_memory

        node = next((n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU")), None)
        if node is None:
            return None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        reader = ray.remote(num_cpus=0, max_calls=1)(read_gpu_memory)
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        try:
            rows = ray.get(reader.options(scheduling_strategy=strategy).remote(), timeout=60)
        except Exception:  # noqa: BLE001 - unread: detect plans with the smaller kind and says so
            return None
        return rows[0]["total"] // 2**20 if rows else None

    gpu, count, note = detect(ray.cluster_resources(), memory_mib)
    return (gpu.name if gpu else None), count, note


def preflight(
    cfg,
    gpu: str | None,
    gpus: int | None,
    config_name: str,
    *,
    dry_run: bool = False,
    from_cluster: bool = False,
) -> int | None:
    """``mmdc.run``'s plan: the exit status to stop with (dry run: its plan's; problems: 2), or None to go on.

    ``from_cluster``: no ``--gpu`` was named; take the kind from the connected Ray cluster, and when it has
    none (a CPU cluster, or an autoscaling one whose GPU nodes have not started) skip the GPU part with a
    note. The GPU count is checked only when named (``--gpus``): an autoscaler may add nodes, and the
    driver waits for them itself. A run without GPUs is checked without DeepSpeed's host estimates (cheap).
    """
    from mmdc.sizing import check

    note = ""
    if from_cluster:
        gpu, count, note = cluster_gpus()
        print(f"[mmdc] plan: {note}", flush=True)
    try:
        plan = check(cfg, gpu, gpus, config_name=config_name, host_memory=dry_run or gpu is not None)
    except ValueError as err:  # an unknown --gpu kind
        print(f"mmdc: {err}", file=sys.stderr)
        return 2
    problems = plan.problems
    if gpu is None and from_cluster:
        skipped = [p for p in problems if p.key == "--gpu"]
        problems = [p for p in problems if p.key != "--gpu"]
        if skipped:
            print(f"[mmdc] plan: GPU part skipped ({note}); name the kind with --gpu to check it", flush=True)
    if dry_run:
        print(plan.render(problems=False), flush=True)
    for problem in problems:
        print(f"mmdc: plan: {problem}", file=sys.stderr)
    if dry_run:
        return 2 if problems else 0
    return 2 if problems else None
