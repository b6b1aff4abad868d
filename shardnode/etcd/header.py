"""The ResponseHeader of every etcd answer a router gives (docs/etcd.md)."""

from __future__ import annotations

import hashlib

from ..config import ClusterConfig
from ..proto import etcd_rpc_pb2 as rpc


def cluster_id(cluster: ClusterConfig) -> int:
    """A stable 64-bit id of the cluster: etcd clients compare it between
    endpoints to see that they talk to one cluster."""
    return int.from_bytes(hashlib.blake2b(cluster.name.encode(), digest_size=8).digest(), "big")


class Header:
    """cluster_id and member_id (the router's host: its node id) are fixed;
    the revision is the answer's (docs/etcd.md, "Revisions"). raft_term is 0:
    there is no one Raft term, each group has its own."""

    def __init__(self, cluster: ClusterConfig, member_id: int) -> None:
        self.cluster_id = cluster_id(cluster)
        self.member_id = member_id

    def make(self, revision: int) -> rpc.ResponseHeader:
        return rpc.ResponseHeader(cluster_id=self.cluster_id, member_id=self.member_id, revision=revision)
