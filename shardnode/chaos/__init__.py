"""Faults against a running cluster, and the checks that nothing went wrong
(docs/testing.md, "Chaos"; `shardnode chaos`).

- `namespaces`: the namespace mode, each host of a cluster in its own network
  namespace with its own address, on a bridge of its own;
- `namespaced_config`: the copy of a cluster.toml whose hosts live in those
  namespaces;
- `network_faults`: partitions and one-way cuts (nftables), delay, jitter,
  loss and reordering (tc netem) between those hosts, always healed;
- `commands`: running `ip`, `nft` and `tc`, with errors that name the command;
- `workloads`: the register workload (linearizability) and the set workload
  (every acknowledged insert present, nothing duplicated), with availability
  measured per fault window;
- `nemesis`: a seeded schedule of bounded faults, each logged with its start
  and its end: partitions, delay, pauses, kills, power loss, shape changes;
- `runner`: one chaos run, its verdict per fault kind.
"""
