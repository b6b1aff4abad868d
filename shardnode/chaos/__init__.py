"""Faults against a running cluster, and the checks that nothing went wrong
(docs/testing.md, "Chaos"; `shardnode chaos`).

- `namespaces`: the namespace mode, each host of a cluster in its own network
  namespace with its own address, on a bridge of its own;
- `namespaced_config`: the copy of a cluster.toml whose hosts live in those
  namespaces;
- `network_faults`: partitions and one-way cuts (nftables), delay, jitter,
  loss and reordering (tc netem) between those hosts, always healed;
- `operations`: the log of every client operation (what, which key, start,
  end, ok / failed / unknown), from which availability is measured;
- `workloads`: the register workload (puts and gets on hot keys of every
  group, recorded for the linearizability checker) and the set workload
  (Jepsen's set: unique inserts, read back once the cluster has healed);
  `set_elements`: what the set workload records and reads back;
- `checkers`: the register checker (linearizable key by key, every write
  applied at most once) and the set checker (every acknowledged insert
  present, no phantom, no failed insert present), as anomalies;
- `availability`: the share of operations that succeeded in each fault
  window, and how long after a moment writes succeeded again;
- `commands`: running `ip`, `nft` and `tc`, with errors that name the command;
- `schedule`: a run's faults drawn from its seed (two tracks: one network or
  process fault at a time, and shape changes beside them);
- `nemesis`: carries the schedule out, each fault bounded, logged with its
  start and its end, and healed: partitions, delay or loss, pauses, kills,
  power loss, shape changes;
- `runner`: one chaos run, its verdict per fault kind.
"""
