"""etcdserverpb.Cluster.MemberList and Maintenance.Status on a router: what
etcd clients ask to find endpoints and check one (docs/etcd.md).

The members are the routers that serve the etcd API (every [[host]] with an
etcd_port): they are the endpoints a client may use. shardnode's replicas
are not etcd members; membership changes go through `shardnode member` and
`shardnode group`, so MemberAdd/Remove/Update/Promote are not served.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc

from ..config import ClusterConfig
from ..proto import etcd_rpc_pb2 as rpc
from ..proto import etcd_rpc_pb2_grpc as rpc_grpc
from .header import Header

#: The etcd API version this router speaks (its messages are etcd 3.4's).
API_VERSION = "3.4.0"


def members(cluster: ClusterConfig) -> list[rpc.Member]:
    scheme = "https" if cluster.security.tls else "http"
    return [
        rpc.Member(ID=host.node_id, name=host.name, peerURLs=[f"{scheme}://{host.router_address}"],
                   clientURLs=[f"{scheme}://{host.etcd_address}"])
        for host in cluster.hosts if host.etcd_address is not None
    ]


class EtcdCluster(rpc_grpc.ClusterServicer):
    def __init__(self, cluster: ClusterConfig, header: Header) -> None:
        self.cluster = cluster
        self.header = header

    async def MemberList(self, request: rpc.MemberListRequest,
                         context: grpc.aio.ServicerContext) -> rpc.MemberListResponse:
        return rpc.MemberListResponse(header=self.header.make(0), members=members(self.cluster))


class EtcdMaintenance(rpc_grpc.MaintenanceServicer):
    """Status answers for this router: its member id, the API version, and
    dbSize: the bytes of every replica's database on its host. The Raft
    fields (leader, raftIndex, raftTerm) are 0: each group has its own
    leader and log (`shardnode status` shows them)."""

    def __init__(self, cluster: ClusterConfig, host_name: str, header: Header) -> None:
        self.header = header
        self._host_dir = cluster.data_dir / host_name

    async def Status(self, request: rpc.StatusRequest, context: grpc.aio.ServicerContext) -> rpc.StatusResponse:
        size = await asyncio.to_thread(_bytes_under, self._host_dir)
        return rpc.StatusResponse(header=self.header.make(0), version=API_VERSION, dbSize=size, dbSizeInUse=size)


def _bytes_under(directory: Path) -> int:
    """The size of the files under `directory` (0 if it is not there)."""
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass            # removed meanwhile (compaction, a snapshot's staging)
    return total
