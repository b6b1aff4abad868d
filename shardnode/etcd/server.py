"""Adds etcd's services to a router's gRPC server (docs/etcd.md)."""

from __future__ import annotations

import grpc

from ..config import ClusterConfig
from ..proto import etcd_rpc_pb2_grpc as rpc_grpc
from ..routing.service import KVService
from .cluster import EtcdCluster, EtcdMaintenance
from .header import Header
from .kv import EtcdKV
from .lease_service import EtcdLease
from .leases import Leases
from .watch import EtcdWatch

#: The services' names, for the health service.
SERVICES = ("etcdserverpb.KV", "etcdserverpb.Watch", "etcdserverpb.Lease", "etcdserverpb.Cluster", "etcdserverpb.Maintenance")


def add_etcd_services(server: grpc.aio.Server, cluster: ClusterConfig, host_name: str, core: KVService) -> Leases:
    """On the router's server, which listens on the etcd port too: the same
    interceptors (TLS identities) apply to both ports. Returns the leases,
    whose expiry rounds the caller starts and stops (Leases.start/close)."""
    header = Header(cluster, cluster.host(host_name).node_id)
    leases = Leases(cluster, host_name, core)
    rpc_grpc.add_KVServicer_to_server(EtcdKV(cluster, core, header, leases), server)
    rpc_grpc.add_LeaseServicer_to_server(EtcdLease(leases, header, core.access), server)
    rpc_grpc.add_WatchServicer_to_server(EtcdWatch(core, header), server)
    rpc_grpc.add_ClusterServicer_to_server(EtcdCluster(cluster, header), server)
    rpc_grpc.add_MaintenanceServicer_to_server(EtcdMaintenance(cluster, host_name, header), server)
    return leases
