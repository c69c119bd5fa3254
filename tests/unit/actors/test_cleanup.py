"""Which placement groups a resumed run may remove: only live ones whose creating actor is dead."""

from mmdc.actors.cleanup import is_orphan


def test_a_live_group_of_a_dead_actor_is_an_orphan():
    assert is_orphan(state="CREATED", creator_actor_id=b"\x01", creator_actor_dead=True, is_detached=False)
    assert is_orphan(state="PENDING", creator_actor_id=b"\x01", creator_actor_dead=True, is_detached=False)


def test_groups_of_live_actors_drivers_detached_or_removed_are_kept():
    assert not is_orphan(state="CREATED", creator_actor_id=b"\x01", creator_actor_dead=False, is_detached=False)
    assert not is_orphan(state="CREATED", creator_actor_id=b"", creator_actor_dead=True, is_detached=False)
    assert not is_orphan(state="CREATED", creator_actor_id=b"\x01", creator_actor_dead=True, is_detached=True)
    assert not is_orphan(state="REMOVED", creator_actor_id=b"\x01", creator_actor_dead=True, is_detached=False)
