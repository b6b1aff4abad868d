"""etcdserverpb.Lease on a router (docs/etcd.md, "Leases"), carried out by leases.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from ..proto import etcd_rpc_pb2 as rpc
from ..proto import etcd_rpc_pb2_grpc as rpc_grpc
from ..routing.access import READ, WRITE, RouterAccess, check
from .header import Header
from .kv import abort, deadline_of
from .leases import Leases


class EtcdLease(rpc_grpc.LeaseServicer):
    def __init__(self, leases: Leases, header: Header, access: RouterAccess) -> None:
        self.leases = leases
        self.header = header
        self.access = access

    async def LeaseGrant(self, request: rpc.LeaseGrantRequest, context) -> rpc.LeaseGrantResponse:
        try:
            lease, ttl = await self.leases.grant(request.TTL, request.ID, _timeout(context))
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        return rpc.LeaseGrantResponse(header=self.header.make(0), ID=lease, TTL=ttl)

    async def LeaseRevoke(self, request: rpc.LeaseRevokeRequest, context) -> rpc.LeaseRevokeResponse:
        try:
            grants = self.access.grants(context)
            if grants is not None:
                # Revoking deletes the lease's keys: a user needs the right to delete each (as in etcd).
                for key in await self.leases.keys(request.ID, _timeout(context)):
                    check(grants, WRITE, key)
            revision = await self.leases.revoke(request.ID, deadline_of(context))
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        return rpc.LeaseRevokeResponse(header=self.header.make(revision))

    async def LeaseKeepAlive(self, requests: AsyncIterator[rpc.LeaseKeepAliveRequest],
                             context) -> AsyncIterator[rpc.LeaseKeepAliveResponse]:
        async for request in requests:
            try:
                ttl = await self.leases.keep_alive(request.ID, 5.0)
            except Exception as exc:  # every refusal and routing error, answered with its gRPC code
                await abort(context, exc)
            yield rpc.LeaseKeepAliveResponse(header=self.header.make(0), ID=request.ID, TTL=ttl)

    async def LeaseTimeToLive(self, request: rpc.LeaseTimeToLiveRequest, context) -> rpc.LeaseTimeToLiveResponse:
        try:
            remaining, granted = await self.leases.time_to_live(request.ID, _timeout(context))
            keys = await self.leases.keys(request.ID, _timeout(context)) if request.keys and remaining >= 0 else []
            grants = self.access.grants(context)
            for key in keys if grants is not None else ():
                check(grants, READ, key)
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        return rpc.LeaseTimeToLiveResponse(header=self.header.make(0), ID=request.ID, TTL=remaining,
                                           grantedTTL=granted, keys=keys)

    async def LeaseLeases(self, request: rpc.LeaseLeasesRequest, context) -> rpc.LeaseLeasesResponse:
        try:
            leases = await self.leases.leases(_timeout(context))
        except Exception as exc:  # every refusal and routing error, answered with its gRPC code
            await abort(context, exc)
        return rpc.LeaseLeasesResponse(header=self.header.make(0), leases=[rpc.LeaseStatus(ID=i) for i in leases])


def _timeout(context: grpc.aio.ServicerContext) -> float:
    return max(0.001, deadline_of(context) - time.monotonic())
