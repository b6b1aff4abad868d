"""A cluster under supervisord with each host in its own network namespace
(the namespace mode, docs/testing.md "Hosts in network namespaces"):

    with start_namespaced(tmp_path, write_cluster_toml(tmp_path, hosts=5)) as cluster:
        cluster.faults.partition(["h1", "h2"], ["h3", "h4", "h5"])
        ...   # clients use cluster.config (the namespaced copy)

On the way out, pass or fail: the faults are healed, every process is
killed by pid (SupervisedCluster.shutdown), then the namespaces go.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shardnode.chaos.namespaced_config import write_namespaced_config
from shardnode.chaos.namespaces import NamespaceNetwork, cleanup_leftovers, namespaces_unavailable, unique_name
from shardnode.chaos.network_faults import NetworkFaults
from shardnode.cli.ready import NotReady, wait_ready
from shardnode.client import Client
from shardnode.config import ClusterConfig

from .supervised import SupervisedCluster, start_supervised

#: Skip a test module with the one-line reason where namespaces cannot be used.
requires_namespaces = pytest.mark.skipif(namespaces_unavailable() is not None,
                                         reason=namespaces_unavailable() or "")


@dataclass
class NamespacedCluster:
    env: SupervisedCluster
    network: NamespaceNetwork
    faults: NetworkFaults
    config: Path              # the namespaced cluster.toml: what clients and admins load

    @property
    def cluster(self) -> ClusterConfig:
        return self.env.cluster


@contextlib.contextmanager
def start_namespaced(tmp: Path, config_path: Path, ready_timeout: float = 90.0) -> Iterator[NamespacedCluster]:
    """Put each host of `config_path` in a namespace of its own, write the
    namespaced copy next to it (cluster-netns.toml), start it as
    start_supervised does, and wait until every group (the metadata group
    too) has a leader and a quorum, as seen by the routers."""
    cleanup_leftovers()        # networks of earlier runs that were killed
    source = ClusterConfig.load(config_path)
    with NamespaceNetwork(unique_name(), [h.name for h in source.hosts]) as network:
        config = write_namespaced_config(config_path, config_path.with_name("cluster-netns.toml"), network)
        with start_supervised(tmp, config) as env:
            faults = NetworkFaults(env.cluster)
            try:
                with Client.from_config(config, timeout=5.0) as client:
                    try:
                        wait_ready(client, ready_timeout)
                    except NotReady as exc:
                        raise AssertionError(f"{exc}\n{env.log_tail()}") from None
                yield NamespacedCluster(env, network, faults, config)
            finally:
                faults.heal()
    left = [name for name in _namespaces() if name.startswith(network.name)]
    assert not left, f"namespaces left behind: {left}"


def _namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]
