"""Waiting until a cluster is ready: every group with a leader and a quorum.

Used by `shardnode status --wait SECONDS` and by `make run`
(scripts/run_cluster.py), which prints one line when the cluster is ready.
"""

from __future__ import annotations

import time

from ..client import Client
from ..errors import RoutersUnreachable, ShardnodeError
from ..proto import kv_pb2


class NotReady(ShardnodeError):
    """The cluster did not have every group led with a quorum in time."""


def wait_ready(client: Client, seconds: float, poll: float = 0.25) -> kv_pb2.StatusResponse:
    """Poll the cluster's status until every group has a leader and a quorum;
    the status then, or NotReady (its message says what was missing) after
    `seconds`. Routers that refuse or fail meanwhile are part of starting up."""
    deadline = time.monotonic() + seconds
    last = "no router answered"
    while True:
        remaining = deadline - time.monotonic()
        try:
            status = client.status(timeout=max(0.05, min(client.timeout, remaining)))
        except RoutersUnreachable:
            last = "no router accepts connections (yet)"
        except ShardnodeError as exc:
            last = str(exc)
        else:
            if status.groups and all(g.has_quorum for g in every_group(status)):
                return status
            last = not_ready_reason(status)
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotReady(f"not ready after {seconds:g} s: {last}")
        # The last look comes at the deadline, not up to a poll before it.
        time.sleep(min(poll, left))


def every_group(status: kv_pb2.StatusResponse) -> list[kv_pb2.GroupStatus]:
    """The data groups, and the metadata group when the router reports it
    (without it no change of shape can be made: it counts for readiness)."""
    groups = list(status.groups)
    if status.HasField("metadata_group"):
        groups.append(status.metadata_group)
    return groups


def not_ready_reason(status: kv_pb2.StatusResponse) -> str:
    """What keeps a cluster from being ready, in one phrase."""
    missing = []
    for group in every_group(status):
        if group.has_quorum:
            continue
        up = sum(1 for r in group.replicas if r.reachable)
        majority = len(group.replicas) // 2 + 1
        name = "the metadata group" if group.name == "meta" else f"group {group.group}"
        if up < majority:
            missing.append(f"{name} has no quorum ({up} of {len(group.replicas)} replicas up)")
        else:
            missing.append(f"{name} has no leader yet ({up} of {len(group.replicas)} replicas up)")
    return "; ".join(missing) or "no group reported"
