"""What the router's and the workers' metrics share.

Importing this module turns off prometheus_client's `*_created` series for
the whole process: they double the number of families on a host's page (a
gauge family per counter and histogram), and a family that the router and a
worker both contribute would carry two `_created` blocks, which strict
consumers (`promtool check metrics`) refuse.

`merge_families` builds one family per name out of several sources (the
router's registry and each local worker's exposition), so that the host's
page has exactly one HELP/TYPE block per family with its samples together.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import prometheus_client
from prometheus_client.core import Metric

prometheus_client.disable_created_metrics()

log = logging.getLogger("shardnode.metrics")

#: Request latency buckets (seconds), the same at the router and at the worker
#: so that one histogram family can hold both components' series.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def merge_families(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """One family per name, in order of first appearance, each holding the
    samples every source gave for it (a source's samples stay in its order,
    so a histogram series keeps its buckets, sum and count together).

    A family whose type disagrees with the one already merged under that
    name is left out (and logged): one page cannot declare two types. A
    series (name and labels) given twice is kept once, the first time.
    """
    merged: dict[str, Metric] = {}
    seen: dict[str, set[tuple[str, tuple[tuple[str, str], ...]]]] = {}
    for source in sources:
        for family in source:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
                seen[family.name] = set()
            elif target.type != family.type:
                log.warning("metrics.type_conflict",
                            extra={"family": family.name, "type": family.type, "merged_type": target.type})
                continue
            series = seen[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key in series:
                    continue
                series.add(key)
                target.samples.append(sample)
    return list(merged.values())
