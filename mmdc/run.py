"""``python -m mmdc.run``: run MmDC end to end, on a laptop or a Ray cluster.

    python -m mmdc.run                                   # embedded default: tiny models, bundled world, CPU
    python -m mmdc.run --config configs/paper.yaml       # the paper's setup on a GPU cluster
    python -m mmdc.run --set run.iterations=1 --set calibration.tau=0.5
    python -m mmdc.run --resume runs/tiny-20261122-101500      # continue after a crash or preemption
    python -m mmdc.run --config configs/paper.yaml --dry-run --gpu v100-32gb --gpus 6   # the plan only
    ray job submit --working-dir . -- python -m mmdc.run --config configs/paper.yaml

Parse the CLI and config, check that its input files are there, take the run directory's lock, connect
to Ray (an existing cluster if there is one, else a local one), check the plan (``mmdc.plan.preflight``:
for ``--gpu`` before Ray starts, else for the cluster's own GPU kind), start the Driver actor, wait for it, print
where the run directory is, or one line saying why the run failed (the traceback goes to its driver.log).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mmdc.config import add_config_arguments, config_file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mmdc.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p)
    p.add_argument("--output", default=None, help="run directory (default: <run.output_dir>/<run.name>-<time>)")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: an address, or 'auto' for the one `ray start` made on this machine "
        "(default: RAY_ADDRESS, as under `ray job submit`, else a new local cluster)",
    )
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a new local Ray cluster")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR after its last completed phase, with its saved config",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept a config that differs from the saved one (--config / --set)",
    )
    p.add_argument(
        "--gpu",
        default=None,
        metavar="KIND",
        help="GPU kind the plan checks the run against, e.g. v100-32gb (default: the Ray cluster's own, from its "
        "GPU and accelerator_type resources; none there: the GPU part of the plan is skipped)",
    )
    p.add_argument("--gpus", type=int, default=None, help="GPUs the plan checks the run against (default: not checked)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (python -m mmdc.plan's, for --gpu/--gpus) and exit"
    )
    return p.parse_args(argv)


def resume_config(args: argparse.Namespace):
    """The config to resume with and the keys that differ from the run's saved one.

    Without --config/--set the saved config is used as it is. With them, a difference is refused
    (a run whose later iterations silently used other settings cannot be reproduced) unless --force.
    """
    from mmdc.config import ConfigError, diff_configs, load_config
    from mmdc.rundir import CorruptState, RunDir

    saved_file = Path(args.resume) / "config.yaml"
    if not saved_file.exists():
        raise ConfigError(f"--resume {args.resume}: no config.yaml there (not an mmdc run directory)")
    saved = load_config(saved_file)
    try:
        RunDir(args.resume).load_state()  # a corrupt state.json is refused here, naming the file
    except CorruptState as err:
        raise ConfigError(f"--resume {args.resume}: {err}") from None
    if not args.config and not args.overrides:
        return saved, []
    cfg = load_config(args.config or saved_file, args.overrides)
    changed = diff_configs(saved, cfg)
    if changed and not args.force:
        raise ConfigError(
            f"--resume {args.resume}: the config differs from the run's saved config in "
            f"{', '.join(changed)}; pass --force to resume with it anyway"
        )
    return cfg, changed


def connect_ray(address: str | None, num_cpus: float | None) -> None:
    """Join the Ray cluster ``address`` names (else RAY_ADDRESS, as under `ray job submit`) or start a local one.

    A new local cluster unless told otherwise: silently joining whatever `ray start` left behind on this
    machine (perhaps long dead) is how a laptop run hangs. A process already connected stays connected.
    """
    import ray

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local" and not ray.is_initialized()
    info = ray.init(
        address=address if not ray.is_initialized() else None,
        num_cpus=num_cpus if local else None,
        runtime_env={"env_vars": env},
        ignore_reinit_error=True,
    )
    dashboard = getattr(info, "dashboard_url", None)
    print(f"[mmdc] Ray dashboard: {'http://' + dashboard if dashboard else 'not running'}", flush=True)


def this_cluster_env() -> dict:
    """The runtime_env of an actor or task that starts Ray Train: RAY_ADDRESS set to the connected cluster's own.

    Ray's address auto-detection (used by the state API, which Ray Train's placement-group cleaner calls) reads
    <temp>/ray/ray_current_cluster, which a `ray start` that was never stopped leaves naming a dead head: then
    every trainer waits 12 s on it. What runs under this env, and what it starts, never looks there.
    """
    import ray

    return {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from mmdc.config import ConfigError, check_inputs, load_config
    from mmdc.rundir import RunLock, RunLocked

    config = config_file(args.config)
    forced: list[str] = []
    try:
        if args.resume:
            cfg, forced = resume_config(args)
        else:
            cfg = load_config(config, args.overrides)
        check_inputs(cfg)  # the files and folders it names are there, before Ray starts
    except ConfigError as err:
        print(f"mmdc: config error: {err}", file=sys.stderr)
        return 2
    if args.dry_run or args.gpu:  # the plan (mmdc.plan) before anything starts; without --gpu, once Ray is up
        from mmdc.plan import preflight

        code = preflight(cfg, args.gpu, args.gpus, config or "the built-in defaults", dry_run=args.dry_run)
        if code is not None:
            return code
    if args.resume and args.output and Path(args.output).resolve() != Path(args.resume).resolve():
        print("mmdc: --resume continues in its own run directory; drop --output", file=sys.stderr)
        return 2
    run_dir = Path(
        args.resume or args.output or Path(cfg.run.output_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    try:
        run_lock = RunLock(run_dir).acquire()  # held by this process for the life of the run (README, Reliability)
    except RunLocked as err:
        print(f"mmdc: {err}", file=sys.stderr)
        return 2
    with run_lock:
        try:
            return start(args, cfg, forced, run_dir, run_lock.token)
        except Exception as err:  # noqa: BLE001 - one line here, the traceback in the run's log
            return failed(err, run_dir)


def start(args: argparse.Namespace, cfg, forced: list[str], run_dir: Path, lock_token: str) -> int:
    """Run the Driver actor in ``run_dir``, whose lock this process holds, and say where the results are."""
    from mmdc.config import to_dict
    from mmdc.rundir import LOCK_FILE

    if forced:
        print(f"mmdc: resuming with changed config keys (--force): {', '.join(forced)}", flush=True)
    if not args.resume and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not cfg.run.overwrite:
        print(
            f"mmdc: run directory {run_dir} is not empty (continue it with --resume {run_dir}, "
            "or set run.overwrite=true to start over in it)",
            file=sys.stderr,
        )
        return 2

    import ray

    connect_ray(args.address, args.num_cpus)
    if not args.gpu:  # the plan's checks for the cluster's own GPU kind (mmdc.plan.preflight)
        from mmdc.plan import preflight

        code = preflight(cfg, None, args.gpus, args.config or "the built-in defaults", from_cluster=True)
        if code is not None:
            return code

    from mmdc.actors.driver import Driver

    driver = Driver.options(name=f"mmdc-driver-{run_dir.name}", runtime_env=this_cluster_env()).remote(
        to_dict(cfg), str(run_dir.resolve()), resume=bool(args.resume), forced=forced, lock_token=lock_token
    )
    result = ray.get(driver.run.remote())
    print(f"mmdc: run directory: {result}", flush=True)
    return 0


def failure_reason(err: BaseException) -> str:
    """One line saying what went wrong: the driver's own exception when a Ray error wraps it, else the error's text
    (the last line of a traceback Ray quotes, which names the exception)."""
    cause = getattr(err, "cause", None)  # RayTaskError: the exception the actor raised
    if isinstance(cause, BaseException):
        err = cause
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def failed(err: BaseException, run_dir: Path) -> int:
    """Print one line (the reason, and where the full log is); the traceback goes to the run's driver.log."""
    import traceback

    from mmdc.rundir import RunDir

    log_file = RunDir(run_dir).log_file
    try:
        with log_file.open("a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} mmdc.run: the run failed\n")
            log.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        where = str(log_file)
    except OSError:
        where = "Ray's logs (`ray logs`, or the dashboard)"
    print(f"mmdc: run failed: {failure_reason(err)} (full log: {where})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
