"""Give back what a crashed attempt of a run still holds, so a resumed run does not wait on it forever.

A placement group made by an actor (Ray Train's controller makes the trainer's) lives until both
its creator actor *and* the creator's job are dead. When the Driver actor is killed but the job
that started it goes on (a test, the ablation runner, a notebook), the trainer's group outlives
its dead controller and keeps its CPUs/GPUs: the next phase that needs them waits forever. Ray
Train's own cleaner actor usually removes it, but it can itself die or time out (seen on an
overloaded 2-core machine). ``orphaned_placement_groups`` finds such groups from the GCS table;
removing them is safe because nothing can ever use a group whose creator is dead.
"""

from __future__ import annotations

import logging

log = logging.getLogger("mmdc.cleanup")


def is_orphan(*, state: str, creator_actor_id: bytes, creator_actor_dead: bool, is_detached: bool) -> bool:
    """A live group whose creating actor is dead (driver-made and detached groups are never orphans)."""
    return (
        state in ("PENDING", "CREATED", "RESCHEDULING")
        and bool(creator_actor_id)
        and creator_actor_dead
        and not is_detached
    )


def orphaned_placement_groups() -> list[str]:
    """Hex ids of the cluster's orphaned placement groups (reads the GCS placement group table)."""
    from ray._private.state import state as global_state
    from ray.core.generated import gcs_pb2

    names = {v: k for k, v in gcs_pb2.PlacementGroupTableData.PlacementGroupState.items()}
    orphans = []
    for raw in global_state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if is_orphan(
            state=names.get(pg.state, "?"),
            creator_actor_id=pg.creator_actor_id,
            creator_actor_dead=pg.creator_actor_dead,
            is_detached=pg.is_detached,
        ):
            orphans.append(pg.placement_group_id.hex())
    return orphans


def remove_orphaned_placement_groups() -> int:
    """Remove every orphaned placement group; return how many. Never raises (best effort, logged)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    try:
        orphans = orphaned_placement_groups()
    except Exception as err:  # noqa: BLE001 - a private table layout change must not stop a run
        log.warning("could not list placement groups: %s", err)
        return 0
    for hex_id in orphans:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))
        log.info("removed placement group %s left by a dead actor", hex_id)
    return len(orphans)
