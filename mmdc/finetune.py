"""``python -m mmdc.finetune``: paper Table 1's protocol for one checkpoint: fine-tune on ScienceQA's train split, then
score its test split.

    python -m mmdc.finetune --checkpoint runs/x/checkpoints/student/iter_3 --benchmark scienceqa \\
        --data scienceqa/llava_train_QCM-LEA.json --images scienceqa/images/train \\
        --eval-data scienceqa/llava_test_QCM-LEA.json --problems scienceqa/problems.json \\
        --pid-splits scienceqa/pid_splits.json --eval-images scienceqa/images/test --output runs/x/scienceqa
    python -m mmdc.finetune ... --config configs/paper.yaml --set tune.num_workers=4

Ray Train fine-tunes with the config's ``tune`` section (strategy, workers, batch sizes, precision; ``--config``,
default configs/tiny.yaml) for 6 epochs at lr 2e-5 (paper 4.1.3) unless ``--set tune.epochs=N`` or
``--set tune.lr=X`` say otherwise; it connects to Ray as ``mmdc.run`` does. With ``--eval-data`` the fine-tuned
checkpoint is then scored by the ScienceQA harness in a Ray task with the student engine's resources
(``engines.student``). The output folder:

    config.yaml                 the resolved config it ran with
    checkpoint/                 the fine-tuned student (HF format; from_pretrained loads it)
    finetune.json               the checkpoint it started from, the train data's counts, the training summary
    skipped.jsonl               train records left out, each with its reason
    metrics.jsonl               one line per optimizer step
    finetuned.json, finetuned.samples.jsonl, finetuned.md      with --eval-data (Table 1's columns with --problems)

The same command again continues an interrupted fine-tune (or reuses a finished one); different training
settings for a non-empty output folder are refused, naming the keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mmdc.config import add_config_arguments, config_file
from mmdc.run import connect_ray, failure_reason, this_cluster_env

FINETUNE_FILE = "finetune.json"
CONFIG_FILE = "config.yaml"
OWN_TUNE_KEYS = ("epochs", "lr")  # --set tune.<key> sets the fine-tune's own (else the paper's 6 and 2e-5)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmdc.finetune",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="HF LLaVA checkpoint to fine-tune (e.g. a run's last student)")
    p.add_argument("--benchmark", required=True, choices=("scienceqa",))
    p.add_argument("--data", required=True, help="LLaVA's converted train file, e.g. llava_train_QCM-LEA.json")
    p.add_argument("--images", required=True, help="the folder its 'image' fields are relative to (images/train)")
    p.add_argument("--output", default=str(Path("finetune-results") / "scienceqa"), help="output folder")
    add_config_arguments(p, example="tune.num_workers=4")
    p.add_argument("--eval-data", help="the converted test file to score the fine-tuned student on")
    p.add_argument("--problems", help="ScienceQA's problems.json (Table 1's NAT/SOC/... columns)")
    p.add_argument("--pid-splits", help="ScienceQA's pid_splits.json (keeps only --split)")
    p.add_argument("--split", default="test", help="split name in pid_splits.json")
    p.add_argument("--eval-images", help="test image folder (default: <eval data dir>/images, else its folder)")
    p.add_argument("--limit", type=int, help="score only the first N test items")
    p.add_argument("--max-new-tokens", type=int, help="answer length at test time (default 1024: room for LEA)")
    p.add_argument("--address", default=None, help="Ray cluster to join, as for mmdc.run (default: a new local one)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a new local Ray cluster")
    args = p.parse_args(argv)
    if args.eval_data is None and (args.problems or args.pid_splits or args.eval_images):
        p.error("--problems, --pid-splits and --eval-images need --eval-data")
    return args


def load(args: argparse.Namespace):
    """The config of this fine-tune: ``--config``, the flags as ``eval.scienceqa`` keys, then ``--set``."""
    from mmdc.config import load_config

    flags = {
        "eval.scienceqa.finetune.data": args.data,
        "eval.scienceqa.finetune.images": args.images,
        "eval.scienceqa.finetune.max_new_tokens": args.max_new_tokens,
        "eval.scienceqa.data": args.eval_data,
        "eval.scienceqa.problems": args.problems,
        "eval.scienceqa.pid_splits": args.pid_splits,
        "eval.scienceqa.split": args.split,
        "eval.scienceqa.images": args.eval_images,
        "eval.limit": args.limit,
    }
    paths = {"data", "images", "problems", "pid_splits"}  # absolute: Ray's workers need not share our cwd
    flags = {k: str(Path(v).resolve()) if k.rsplit(".", 1)[-1] in paths and v else v for k, v in flags.items()}
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    config = config_file(args.config)
    cfg = load_config(config, overrides + list(args.overrides))
    given = {item.split("=", 1)[0].strip() for item in args.overrides}
    for key in OWN_TUNE_KEYS:
        if f"tune.{key}" in given:
            setattr(cfg.eval.scienceqa.finetune, key, getattr(cfg.tune, key))
    return cfg


def refusal(out: Path, cfg, checkpoint: str) -> str | None:
    """Why ``out`` cannot take this fine-tune (a non-empty folder made from another checkpoint or other training
    settings), or None."""
    from mmdc.config import diff_configs, load_config
    from mmdc.eval.finetune import stale_finetune_keys

    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / CONFIG_FILE).exists() or not (out / FINETUNE_FILE).exists():
        return f"{out} is not empty and holds no earlier fine-tune; choose another --output"
    stale = stale_finetune_keys(diff_configs(load_config(out / CONFIG_FILE), cfg))
    if json.loads((out / FINETUNE_FILE).read_text())["init_checkpoint"] != str(Path(checkpoint).resolve()):
        stale.append("--checkpoint")
    if stale:
        return f"{out} holds a fine-tune made with other settings ({', '.join(stale)}); choose another --output"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from mmdc.config import ConfigError, dump_config

    try:
        cfg = load(args)
    except ConfigError as err:
        print(f"mmdc.finetune: config error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output).resolve()
    problem = refusal(out, cfg, args.checkpoint)
    if problem:
        print(f"mmdc.finetune: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / CONFIG_FILE)
    record = {"init_checkpoint": str(Path(args.checkpoint).resolve()), "train_data": cfg.eval.scienceqa.finetune.data}
    (out / FINETUNE_FILE).write_text(json.dumps(record, indent=1) + "\n")

    import ray

    from mmdc.eval.finetune import evaluate_checkpoint, finetune_scienceqa

    connect_ray(args.address, args.num_cpus)
    # In a task of its own, as mmdc.run's Driver: Ray Train then knows this cluster's address (this_cluster_env).
    fine_tune = ray.remote(num_cpus=0)(finetune_scienceqa).options(runtime_env=this_cluster_env())
    try:
        tuned = ray.get(
            fine_tune.remote(
                args.checkpoint,
                cfg,
                out / "checkpoint",
                announce=lambda message: print(f"[mmdc.finetune] {message}", flush=True),
                metrics_path=str(out / "metrics.jsonl"),
                run_name=f"finetune-{out.name}",
            )
        )
    except (ValueError, FileNotFoundError) as err:  # the train data cannot make a fine-tune: one readable line
        print(f"mmdc.finetune: {failure_reason(err)}", file=sys.stderr)
        return 2
    (out / "skipped.jsonl").write_text("".join(json.dumps(skip, default=str) + "\n" for skip in tuned.skipped))
    record.update(data=tuned.data, summary=tuned.summary)
    (out / FINETUNE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"mmdc.finetune: fine-tuned {tuned.checkpoint}: {tuned.data['rows']} train rows "
        f"({tuned.data['text_only']} text-only, {tuned.data['skipped']} skipped), {tuned.summary.get('steps')} steps, "
        f"loss {tuned.summary.get('first_loss')} -> {tuned.summary.get('final_loss')}",
        flush=True,
    )
    if args.eval_data:
        from mmdc.eval import report

        engine = cfg.engines["student"]
        task = ray.remote(num_cpus=engine.num_cpus, num_gpus=engine.num_gpus)(evaluate_checkpoint)
        payload = ray.get(task.remote(tuned.checkpoint, cfg.eval, engine, str(out)))
        table = report.render_markdown("scienceqa (fine-tuned)", payload["metrics"], payload["meta"])
        (out / "finetuned.md").write_text(table, encoding="utf-8")
        sys.stdout.write(table)
    print(f"mmdc.finetune: results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
