"""``python -m mmdc.run``: run MmDC end to end, on a laptop or a Ray cluster.

    python -m mmdc.run                                   # embedded default: tiny models, bundled world, CPU
    python -m mmdc.run --config configs/paper.yaml       # the paper's setup on a GPU cluster
    python -m mmdc.run --set run.iterations=1 --set calibration.tau=0.5
    ray job submit --working-dir . -- python -m mmdc.run --config configs/paper.yaml

Parse the CLI and config, connect to Ray (an existing cluster if there is one, else a local one),
start the Driver actor, wait for it, print where the run directory is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mmdc.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"YAML config (default: {DEFAULT_CONFIG.name} when present)")
    p.add_argument("--output", default=None, help="run directory (default: <run.output_dir>/<run.name>-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set calibration.tau=0.5 (repeatable)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: an address, or 'auto' for the one `ray start` made on this machine "
                        "(default: RAY_ADDRESS, as under `ray job submit`, else a new local cluster)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a new local Ray cluster")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from mmdc.config import ConfigError, load_config, to_dict

    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as err:
        print(f"mmdc: config error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.output or Path(cfg.run.output_dir) / f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.overwrite:
        print(f"mmdc: run directory {run_dir} is not empty (set run.overwrite=true to reuse it)", file=sys.stderr)
        return 2

    import ray

    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A new local cluster unless told otherwise: silently joining whatever `ray start` left
    # behind on this machine (perhaps long dead) is how a laptop run hangs.
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local" and not ray.is_initialized()
    info = ray.init(address=address if not ray.is_initialized() else None, num_cpus=args.num_cpus if local else None,
                    runtime_env={"env_vars": env}, ignore_reinit_error=True)
    dashboard = getattr(info, "dashboard_url", None)
    print(f"[mmdc] Ray dashboard: {'http://' + dashboard if dashboard else 'not running'}", flush=True)

    from mmdc.actors.driver import Driver

    driver = Driver.options(name=f"mmdc-driver-{run_dir.name}").remote(to_dict(cfg), str(run_dir.resolve()))
    try:
        result = ray.get(driver.run.remote())
    except Exception as err:  # noqa: BLE001 - one readable line, the traceback is in the log above
        print(f"mmdc: run failed: {err}", file=sys.stderr)
        return 1
    print(f"mmdc: run directory: {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
