"""Resources are data: what each phase needs, checked against the cluster before anything starts.

The driver never waits for resources that cannot come: if the engines of an inference phase or
the trainer's workers do not fit the cluster's totals, the run stops at once with a message that
names the phase, the resource and both numbers.

Autoscaling clusters are the exception, because there the resources *can* come: a cluster YAML or
KubeRay manifest typically starts its GPU worker group at 0 nodes. ``wait_for_resources`` then asks
Ray's autoscaler for the bundles of the largest phase (``ray.autoscaler.sdk.request_resources``;
phases run one after another, so the largest one, not the sum, must fit) and waits up to
``run.resource_wait_s`` for ``check_fits`` to pass, logging what it waits for. The request stands
for the whole run, so the autoscaler does not take GPU nodes away between phases (for instance while
the CPU-only prepare phase reads images); the driver clears it with ``clear_resource_request`` when
the run ends.

Which clusters autoscale: those whose autoscaler is Ray's v2 autoscaler, the default of ``ray up``
since Ray 2.50 and of KubeRay with in-tree autoscaling. A local cluster (``ray.init()``, ``ray start
--head``) has none, and the check fails at once as before. A cluster still on the v1 autoscaler
(``RAY_UP_enable_autoscaler_v2=0``) is not detected either: start it with v2.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal, Protocol

from mmdc.config import Config, ConfigError

log = logging.getLogger("mmdc.resources")

Bundle = dict[str, float]  # one resource shape Ray must place on a single node: {"CPU": 4, "GPU": 1}
RESOURCES = ("CPU", "GPU")


def _bundles(count: int, cpus: float, gpus: float) -> list[Bundle]:
    """``count`` equal shapes, each without its zero entries; none when the shape is empty."""
    shape = {k: float(v) for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    return [dict(shape) for _ in range(max(count, 0))] if shape else []


def phase_bundles(cfg: Config) -> dict[str, list[Bundle]]:
    """Resource shapes per phase: one per engine replica, train worker or CLIP-scoring actor (the stage 1
    CLIP filter, when enabled, runs first in align and is released before align's trainer starts)."""

    def engine(name: str) -> list[Bundle]:
        e = cfg.engines[name]
        return _bundles(e.replicas, e.num_cpus, e.num_gpus)

    teacher, student = engine("teacher"), engine("student")
    bundles = {"teach": teacher, "assess": teacher + student, "augment": teacher}
    for stage in ("align", "tune"):
        t = getattr(cfg, stage)
        if t.enabled:
            bundles[stage] = _bundles(t.num_workers, t.cpus_per_worker, t.gpus_per_worker)
    clip = cfg.data.clip_filter
    if cfg.align.enabled and clip.enabled:  # scoring actors run inside align, before its trainer starts
        bundles["clip_filter"] = _bundles(clip.concurrency, clip.num_cpus, clip.num_gpus)
    return bundles


def _total(bundles: list[Bundle]) -> dict[str, float]:
    return {res: sum(b.get(res, 0.0) for b in bundles) for res in RESOURCES}


def phase_needs(cfg: Config) -> dict[str, dict[str, float]]:
    """Peak resources per phase. Inference phases hold engines; training holds only its workers."""
    return {phase: _total(bundles) for phase, bundles in phase_bundles(cfg).items()}


def check_fits(cfg: Config, cluster: dict[str, float]) -> list[str]:
    """Human-readable problems; empty when every phase fits the cluster's total resources."""
    problems = []
    for phase, need in phase_needs(cfg).items():
        for res, amount in need.items():
            have = float(cluster.get(res, 0.0))
            if amount > have + 1e-9:
                problems.append(f"phase '{phase}' needs {amount:g} {res} but the cluster has {have:g}")
    return problems


def fit_error(problems: list[str]) -> ConfigError:
    """The one error a run stops with when the configured resources do not fit the cluster."""
    return ConfigError("the configured resources do not fit this cluster:\n  " + "\n  ".join(problems))


def request_bundles(cfg: Config) -> list[Bundle]:
    """What to ask an autoscaler for: the largest phase's own shapes (GPUs first, then CPUs), topped up
    with 1-CPU / 1-GPU bundles (and a fractional rest) until every other phase's totals fit as well."""
    shapes, needs = phase_bundles(cfg), phase_needs(cfg)
    largest = max(needs, key=lambda phase: (needs[phase]["GPU"], needs[phase]["CPU"]))
    bundles = [dict(b) for b in shapes[largest]]
    for res in RESOURCES:
        short = max(need[res] for need in needs.values()) - needs[largest][res]
        whole, rest = divmod(round(short, 6), 1.0)
        bundles += [{res: 1.0} for _ in range(int(whole))]
        if rest > 0:
            bundles.append({res: rest})
    return bundles


def describe_bundles(bundles: list[Bundle]) -> str:
    """``2 x {CPU: 4, GPU: 1} + 1 x {CPU: 1}``, for log lines."""
    counts = Counter(tuple(sorted(b.items())) for b in bundles)
    parts = [f"{n} x {{{', '.join(f'{k}: {v:g}' for k, v in shape)}}}" for shape, n in counts.items()]
    return " + ".join(parts) or "nothing"


def resource_action(
    problems: list[str], autoscaling: bool, waited_s: float, timeout_s: float
) -> Literal["ok", "wait", "fail"]:
    """Go on, keep waiting for the autoscaler, or stop with the fit error."""
    if not problems:
        return "ok"
    if autoscaling and waited_s < timeout_s:
        return "wait"
    return "fail"


class Cluster(Protocol):
    """What ``wait_for_resources`` needs from a cluster (the connected Ray cluster, or a fake in tests)."""

    def resources(self) -> dict[str, float]: ...

    def can_autoscale(self) -> bool: ...

    def request(self, bundles: list[Bundle]) -> None: ...

    def pending(self) -> str: ...


class RayCluster:
    """The Ray cluster this process is connected to."""

    def resources(self) -> dict[str, float]:
        import ray

        return ray.cluster_resources()

    def can_autoscale(self) -> bool:
        """True when a v2 autoscaler runs (it marks itself in the GCS); a local cluster has none."""
        try:
            from ray.autoscaler.v2.utils import is_autoscaler_v2

            return bool(is_autoscaler_v2(fetch_from_server=True))
        except Exception:  # noqa: BLE001 - no autoscaler information: treat as a fixed cluster
            return False

    def request(self, bundles: list[Bundle]) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)

    def pending(self) -> str:
        """What the autoscaler is doing about it, e.g. ``launching 2 x gpu-v100``; "" when unknown."""
        try:
            import ray
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
        except Exception:  # noqa: BLE001 - the status only decorates a log line
            return ""
        launching = [f"{r.count} x {r.ray_node_type_name}" for r in status.pending_launches]
        starting = Counter(n.ray_node_type_name for n in status.pending_nodes)
        failed = [f"{r.ray_node_type_name} ({r.details})" for r in status.failed_launches][-2:]
        parts = [
            f"launching {', '.join(launching)}" if launching else "",
            f"starting {', '.join(f'{n} x {t}' for t, n in starting.items())}" if starting else "",
            f"failed launches: {'; '.join(failed)}" if failed else "",
        ]
        return "; ".join(p for p in parts if p)


def wait_for_resources(
    cfg: Config,
    timeout_s: float,
    cluster: Cluster | None = None,
    *,
    say: Callable[[str], None] = log.info,
    poll_s: float = 5.0,
    log_every_s: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Return once every phase fits the cluster; raise ``fit_error`` when it does not and cannot.

    A cluster that fits returns at once (False: nothing requested). A cluster without an autoscaler,
    or ``timeout_s <= 0``, fails at once. Otherwise the largest phase's bundles are requested and the
    cluster polled every ``poll_s`` until it fits (True: a standing request was placed; call
    ``clear_resource_request`` when the run ends) or ``timeout_s`` passes.
    """
    cluster = cluster or RayCluster()
    problems = check_fits(cfg, cluster.resources())
    autoscaling = bool(problems) and timeout_s > 0 and cluster.can_autoscale()
    if resource_action(problems, autoscaling, 0.0, timeout_s) == "ok":
        return False
    if not autoscaling:
        raise fit_error(problems)
    bundles = request_bundles(cfg)
    cluster.request(bundles)
    say(
        f"asked the autoscaler for {describe_bundles(bundles)}; waiting up to {timeout_s:g}s because "
        + "; ".join(problems)
    )
    start = last_say = clock()
    while (action := resource_action(problems, True, clock() - start, timeout_s)) == "wait":
        sleep(poll_s)
        problems = check_fits(cfg, cluster.resources())
        if problems and clock() - last_say >= log_every_s:
            doing = cluster.pending()
            say(
                f"still waiting for the autoscaler ({clock() - start:.0f}s of {timeout_s:g}s): {problems[0]}"
                + (f"; {doing}" if doing else "")
            )
            last_say = clock()
    if action == "fail":
        raise ConfigError(
            f"{fit_error(problems)}\n(waited {timeout_s:g}s for the autoscaler to provide "
            f"{describe_bundles(bundles)}; raise run.resource_wait_s or check the node types' "
            "max_workers)"
        )
    say(f"the cluster has what the run needs after {clock() - start:.0f}s")
    return True


def clear_resource_request() -> None:
    """Withdraw the standing autoscaler request so idle nodes can scale down (call when the run ends)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Poll until ``predicate()`` is true or fail with a message naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)
