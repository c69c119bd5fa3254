"""``python -m mmdc.ablate``: MmDC against plain distillation at the same teacher budget, the paper's ablations
(Tables 4 and 5), over seeds, from one command.

    python -m mmdc.ablate --config configs/tiny.yaml --out runs/calibration --preset experiment --budget-from mmdc
    python -m mmdc.ablate --config configs/tiny.yaml --out runs/ablation --preset table4 --seeds 0,1,2
    python -m mmdc.ablate --out runs/ablation --variant lr_hi:tune.lr=3e-3,tune.epochs=3 --preset mmdc
    python -m mmdc.ablate --out runs/calibration --preset experiment --budget-from mmdc --summarize-only

Each variant is a name and config overrides; each (variant, seed) is one ordinary
run (``mmdc.run.main``, in this process, one Ray cluster for all of them) in its
own directory ``<out>/<variant>-seed<k>``. A finished run is skipped and an
interrupted one resumed (``--resume``), so the command can simply be run again
after a crash. Every variant's config is validated before the first run starts.

Built-in presets (``--preset``; groups ``experiment``, ``table4``, ``table5``, ``plain``, ``all``):

    mmdc        calibration.tau=0.33              the paper's setting: the reference row
    tau_0       calibration.tau=0                 every instruction hard: no easy ones (Table 4)
    tau_0.67    calibration.tau=0.67              (Table 4)
    tau_1       calibration.tau=1                 almost everything easy (Table 4)
    no_stage1   align.enabled=false               without multimodal alignment (Table 5)
    plain       calibration.selection=random      plain distillation: no assessment, random parents (issue 9)

    experiment  mmdc, plain, tau_0, tau_0.67, tau_1: does calibration beat plain distillation, and what does tau do

Same teacher budget (``--budget-from mmdc``): the mmdc arm runs first; then every arm that selects at random
(``calibration.selection=random``) and sets no share of its own draws, in each iteration, the share of the cache
pool that mmdc's assessments sent to the augmentor (mean over seeds; ``calibration.random_fractions``), so both
arms ask for the same number of new questions and teacher answers.

The summary (``<out>/summary.md`` and ``summary.json``) opens with the command that reproduces it, then per
variant the mean and 95 % confidence interval over seeds of the final score per benchmark (Tables 4/5), of every
column, and of both per iteration (Figure 4); the paired difference per seed of each ``--pair`` (by default
mmdc - plain, when both run); the regime figures per arm and iteration (``mmdc.eval.ablation``); and what the
loop did. ``--summarize-only`` rebuilds it from the runs in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mmdc.config import add_config_arguments, config_file
from mmdc.eval.ablation import (
    SUMMARY_JSON,
    SUMMARY_MD,
    Variant,
    build_summary,
    measured_parent_shares,
    render_summary,
    run_dir,
    run_status,
    write_summary,
)

PRESETS: dict[str, tuple[str, ...]] = {
    "mmdc": ("calibration.tau=0.33",),
    "tau_0": ("calibration.tau=0",),
    "tau_0.67": ("calibration.tau=0.67",),
    "tau_1": ("calibration.tau=1",),
    "no_stage1": ("align.enabled=false",),
    "plain": ("calibration.selection=random",),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "experiment": ("mmdc", "plain", "tau_0", "tau_0.67", "tau_1"),  # issue 24: calibration vs plain, and tau
    "table4": ("tau_0", "mmdc", "tau_0.67", "tau_1"),  # the paper's tau ablation, in its row order
    "table5": ("mmdc", "no_stage1"),  # with and without stage 1
    "plain": ("mmdc", "plain"),  # MmDC against plain distillation (issue 9)
    "all": tuple(PRESETS),
}
DEFAULT_PAIRS = (("mmdc", "plain"),)  # compared seed by seed whenever both arms run
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # a variant name is a directory name
_KEY = re.compile(r"^[A-Za-z_][\w.]*$")  # a dotted config key
_OVERRIDE_SPLIT = re.compile(r",\s*(?=[A-Za-z_][\w.]*\s*=)")  # a comma that starts the next key=value
BUDGET_KEY = "calibration.random_fractions"
_PLACEHOLDER_SHARES = "[0.5]"  # stands in for the measured shares when a budgeted variant's config is validated


def parse_variant(text: str) -> Variant:
    """``NAME:key=value[,key=value]`` (or a preset's name alone) -> Variant.

    A comma separates overrides only where the next ``key=`` starts, so a value
    may hold commas itself (``data.x=[1, 2]``).
    """
    name, sep, rest = text.strip().partition(":")
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError(f"variant {text!r}: the name must be letters, digits, '_', '.' or '-' (it names a folder)")
    if not sep:
        if name in PRESETS:
            return Variant(name, PRESETS[name])
        raise ValueError(f"variant {text!r}: write NAME:key=value[,key=value], or a preset ({', '.join(PRESETS)})")
    overrides = tuple(part.strip() for part in _OVERRIDE_SPLIT.split(rest) if part.strip())
    if not overrides:
        raise ValueError(f"variant {text!r}: no overrides after ':'")
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not _KEY.match(key.strip()):
            raise ValueError(f"variant {text!r}: override {item!r} must look like key.path=value")
    return Variant(name, overrides)


def resolve_variants(presets: Sequence[str], variants: Sequence[str]) -> list[Variant]:
    """Presets (names or groups) then explicit variants, in order, each name once; all presets when none given."""
    chosen: list[Variant] = []
    for item in presets:
        if item in GROUPS:
            chosen += [Variant(n, PRESETS[n]) for n in GROUPS[item]]
        elif item in PRESETS:
            chosen.append(Variant(item, PRESETS[item]))
        else:
            raise ValueError(f"unknown preset {item!r} (presets: {', '.join(PRESETS)}; groups: {', '.join(GROUPS)})")
    chosen += [parse_variant(v) for v in variants]
    if not chosen:
        chosen = [Variant(n, PRESETS[n]) for n in GROUPS["all"]]
    unique: dict[str, Variant] = {}
    for v in chosen:
        if v.name in unique and unique[v.name] != v:
            raise ValueError(f"variant name {v.name!r} is used twice with different overrides")
        unique.setdefault(v.name, v)
    return list(unique.values())


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2] (distinct, in order)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: a comma-separated list of integers") from None
    if not seeds:
        raise ValueError("--seeds: at least one seed")
    return list(dict.fromkeys(seeds))


def parse_pairs(items: Sequence[str], variants: Sequence[Variant]) -> list[tuple[str, str]]:
    """``--pair A:B`` -> [(A, B)], each naming a chosen variant; none given: ``DEFAULT_PAIRS`` whose arms both run."""
    names = {v.name for v in variants}
    if not items:
        return [(a, b) for a, b in DEFAULT_PAIRS if a in names and b in names]
    pairs = []
    for item in items:
        a, sep, b = item.partition(":")
        if not sep or a not in names or b not in names or a == b:
            raise ValueError(f"--pair {item!r}: write A:B with two different variants of this ablation")
        pairs.append((a, b))
    return list(dict.fromkeys(pairs))


def run_overrides(variant: Variant, seed: int, base: Sequence[str] = ()) -> list[str]:
    """What one run sets on top of the config: the shared overrides, the variant's, then the seed and name."""
    return [*base, *variant.overrides, f"run.seed={seed}", f"run.name={variant.name}-seed{seed}"]


# ----------------------------------------------------------------------------- the same teacher budget


def needs_budget(variant: Variant) -> bool:
    """A variant that draws its parents at random and sets no share of its own: ``--budget-from`` gives it one."""
    keys = {item.partition("=")[0].strip(): item.partition("=")[2].strip() for item in variant.overrides}
    random = keys.get("calibration.selection") == "random"
    return random and not any(k.startswith("calibration.random_fraction") for k in keys)


def with_shares(variant: Variant, shares: Sequence[float] | str) -> Variant:
    """``variant`` drawing ``shares`` of the cache pool per iteration (``calibration.random_fractions``)."""
    value = shares if isinstance(shares, str) else "[" + ", ".join(f"{s:g}" for s in shares) + "]"
    return Variant(variant.name, (*variant.overrides, f"{BUDGET_KEY}={value}"))


def budgeted(
    out: Path, variants: Sequence[Variant], source: str | None, seeds: Sequence[int]
) -> tuple[list[Variant], list[float] | None]:
    """The variants with ``source``'s measured parent shares given to those that ``needs_budget`` (unchanged when
    ``source`` is None or has no assessment yet), and the shares."""
    if source is None:
        return list(variants), None
    shares = measured_parent_shares(out, next(v for v in variants if v.name == source), seeds)
    if shares is None:
        return list(variants), None
    return [with_shares(v, shares) if needs_budget(v) else v for v in variants], shares


# ----------------------------------------------------------------------------- running


def plan(
    out: Path,
    config: str | None,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    base: Sequence[str] = (),
    ray_args: Sequence[str] = (),
) -> list[tuple[Path, str, list[str]]]:
    """(run directory, status, argv for ``mmdc.run.main``) for every variant x seed."""
    steps = []
    for variant in variants:
        for seed in seeds:
            path = run_dir(out, variant, seed)
            status = run_status(path)
            if status == "unfinished":
                argv = ["--resume", str(path), *ray_args]
            else:
                argv = (["--config", config] if config else []) + ["--output", str(path), *ray_args]
                for item in run_overrides(variant, seed, base):
                    argv += ["--set", item]
            steps.append((path, status, argv))
    return steps


def validate(config: str | None, variants: Sequence[Variant], seeds: Sequence[int], base: Sequence[str]) -> None:
    """Load every variant's config now: a typo fails in a second, not after hours of earlier runs."""
    from mmdc.config import load_config

    for variant in variants:
        load_config(config, run_overrides(variant, seeds[0], base))


def run_all(steps: Sequence[tuple[Path, str, list[str]]], runner: Callable[[list[str]], int]) -> list[dict]:
    """Run the steps one after another; a failed run is recorded and the others still run."""
    outcomes = []
    for path, status, argv in steps:
        if status == "finished":
            print(f"[ablate] {path.name}: finished earlier, kept", flush=True)
            outcomes.append({"run": path.name, "rc": 0, "skipped": True})
            continue
        print(f"[ablate] {path.name}: {'resuming' if status == 'unfinished' else 'starting'}", flush=True)
        try:
            rc = runner(argv)
        except Exception as err:  # noqa: BLE001 - one bad run must not lose the others
            print(f"[ablate] {path.name}: failed: {err}", file=sys.stderr, flush=True)
            rc = 1
        outcomes.append({"run": path.name, "rc": rc, "skipped": False})
    return outcomes


def command_line(argv: Sequence[str]) -> str:
    """The command that reproduces a summary: this invocation without ``--summarize-only`` and ``--dry-run``."""
    kept = [a for a in argv if a not in ("--summarize-only", "--dry-run")]
    return "python -m mmdc.ablate " + shlex.join(kept)


def recorded_command(out: Path) -> str | None:
    """The command an earlier summary in ``out`` was made with (``--summarize-only`` keeps it)."""
    try:
        return json.loads((out / SUMMARY_JSON).read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmdc.ablate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--out", required=True, help="folder for the runs and the summary")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated run seeds (default: 0,1,2,3,4)")
    p.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a preset ({', '.join(PRESETS)}) or group ({', '.join(GROUPS)}); repeatable",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="a variant of your own; repeatable (with no --preset/--variant: every preset)",
    )
    add_config_arguments(p, example="run.iterations=3")
    p.add_argument(
        "--budget-from",
        default=None,
        metavar="VARIANT",
        help="run VARIANT first, then give every random-selection variant without a share of its own VARIANT's "
        "measured parent share per iteration (the same teacher budget)",
    )
    p.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="A:B",
        help="report the paired difference A - B per seed (repeatable; default: mmdc:plain when both run)",
    )
    p.add_argument("--address", default=None, help="Ray cluster to join (as for python -m mmdc.run)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a new local Ray cluster")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--summarize-only", action="store_true", help="only rebuild the summary from the runs in --out")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from mmdc.config import ConfigError

    try:
        variants = resolve_variants(args.preset, args.variant)
        seeds = parse_seeds(args.seeds)
        pairs = parse_pairs(args.pair, variants)
        if args.budget_from is not None and args.budget_from not in {v.name for v in variants}:
            raise ValueError(f"--budget-from {args.budget_from}: not a variant of this ablation")
    except ValueError as err:
        print(f"mmdc.ablate: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    config = config_file(args.config)
    source = args.budget_from
    command = (recorded_command(out) if args.summarize_only else None) or command_line(argv)
    failed: list[str] = []
    if not args.summarize_only:
        # The budgeted variants' shares are measured later: validate them with a stand-in.
        checked = [with_shares(v, _PLACEHOLDER_SHARES) if source and needs_budget(v) else v for v in variants]
        try:
            validate(config, checked, seeds, args.overrides)
        except ConfigError as err:
            print(f"mmdc.ablate: config error: {err}", file=sys.stderr)
            return 2
        ray_args = (["--address", args.address] if args.address else []) + (
            ["--num-cpus", str(args.num_cpus)] if args.num_cpus is not None else []
        )
        first = [v for v in variants if v.name == source]  # the budget's source runs before everything else
        rest = [v for v in variants if v.name != source]
        if args.dry_run:
            later, shares = budgeted(out, first + rest, source, seeds)
            for path, status, run_argv in plan(out, config, later, seeds, args.overrides, ray_args):
                print(f"{path.name} [{status}]: python -m mmdc.run {' '.join(run_argv)}")
            if source and shares is None:
                print(f"(the random-selection variants get {BUDGET_KEY} from {source}'s runs once they ran)")
            return 0
        from mmdc.run import main as run_main

        outcomes = run_all(plan(out, config, first, seeds, args.overrides, ray_args), run_main)
        later, shares = budgeted(out, first + rest, source, seeds)
        if source and shares is None:
            print(f"mmdc.ablate: --budget-from {source}: its runs have no assessment", file=sys.stderr)
            later = [v for v in later if not (v.name != source and needs_budget(v))]
        elif source:
            print(f"[ablate] parent shares per iteration from {source}: {shares}", flush=True)
        outcomes += run_all(plan(out, config, later[len(first) :], seeds, args.overrides, ray_args), run_main)
        failed = [o["run"] for o in outcomes if o["rc"] != 0]
        if failed:
            print(f"mmdc.ablate: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    reported, _ = budgeted(out, variants, source, seeds)
    write_summary(out, reported, seeds, pairs, command)
    print(f"mmdc.ablate: summary in {out / SUMMARY_MD}")
    return 1 if failed else 0


__all__ = [
    "GROUPS",
    "PRESETS",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "Variant",
    "build_summary",
    "main",
    "parse_variant",
    "plan",
    "render_summary",
    "resolve_variants",
    "run_all",
    "write_summary",
]

if __name__ == "__main__":
    sys.exit(main())
