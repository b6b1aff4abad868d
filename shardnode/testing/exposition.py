"""A strict reader of Prometheus's text exposition format (version 0.0.4).

prometheus_client's own parser is lenient: it accepts a page that declares a
family twice or scatters a family's samples, which Prometheus's stricter
consumers (`promtool check metrics`, other scrapers) refuse. `check_exposition`
applies the format's rules and returns every violation it finds, as
`line N: what`, so that a test can print them all:

- comment lines: `# HELP name text` and `# TYPE name type` (counter, gauge,
  histogram, summary, untyped); at most one of each per family, and the TYPE
  line before the family's first sample;
- a family's lines form one group: once another family has started, no more
  samples, HELP or TYPE of the earlier one;
- metric names `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names
  `[a-zA-Z_][a-zA-Z0-9_]*` (not starting with `__`), each label once per
  sample, label values quoted with only `\\\\`, `\\"` and `\\n` escapes;
- values are floats (or NaN, +Inf, -Inf), optionally followed by an integer
  timestamp;
- a sample belongs to its family by name: `name` for counters, gauges and
  untyped; `name_bucket`/`name_sum`/`name_count` for histograms (and `name`,
  `name_sum`, `name_count` for summaries); each series (name and labels) once;
- every histogram series has buckets with an `le` label, cumulative counts
  that never decrease, a `+Inf` bucket equal to its `_count`, and a `_sum`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["ExpositionFamily", "check_exposition", "parse_exposition"]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}

Labels = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class ExpositionFamily:
    name: str
    type: str = "untyped"
    help: str | None = None
    # (sample name, labels, value), in page order
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)


class _Violation(Exception):
    pass


def parse_exposition(text: str) -> tuple[dict[str, ExpositionFamily], list[str]]:
    """The page's families by name, and its violations (empty if it is valid)."""
    families: dict[str, ExpositionFamily] = {}
    errors: list[str] = []
    current: str | None = None          # the family whose group is open
    closed: set[str] = set()            # families whose group has ended
    typed: set[str] = set()
    helped: set[str] = set()
    series: set[tuple[str, Labels]] = set()

    def enter(name: str, number: int) -> ExpositionFamily:
        nonlocal current
        if name != current:
            if name in closed:
                errors.append(f"line {number}: lines of family {name!r} after another family began "
                              "(a family's lines must form one group)")
            if current is not None:
                closed.add(current)
            current = name
        return families.setdefault(name, ExpositionFamily(name))

    if text and not text.endswith("\n"):
        errors.append("the page does not end with a newline")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            if line.startswith("#"):
                parts = line[1:].strip().split(None, 2)
                if len(parts) < 2 or parts[0] not in ("HELP", "TYPE"):
                    continue                  # an ordinary comment
                keyword, name = parts[0], parts[1]
                rest = parts[2] if len(parts) > 2 else ""
                if not _METRIC_NAME.fullmatch(name):
                    raise _Violation(f"invalid metric name {name!r} in {keyword}")
                family = enter(name, number)
                if keyword == "HELP":
                    if name in helped:
                        raise _Violation(f"second HELP line for {name!r}")
                    helped.add(name)
                    family.help = rest
                else:
                    if name in typed:
                        raise _Violation(f"second TYPE line for {name!r}")
                    if family.samples:
                        raise _Violation(f"TYPE line for {name!r} after its samples")
                    if rest not in _TYPES:
                        raise _Violation(f"unknown type {rest!r} for {name!r}")
                    typed.add(name)
                    family.type = rest
                continue
            sample_name, labels, value = _parse_sample(line)
            family_name = _family_of(sample_name, families, current)
            family = enter(family_name, number)
            if sample_name[len(family_name):] not in _SUFFIXES[family.type]:
                raise _Violation(f"sample {sample_name!r} does not belong to {family.type} {family_name!r}")
            if family.type == "histogram" and sample_name.endswith("_bucket") and "le" not in dict(labels):
                raise _Violation(f"histogram bucket {sample_name!r} without an le label")
            key = (sample_name, tuple(sorted(labels)))
            if key in series:
                raise _Violation(f"duplicate series {sample_name}{dict(labels)}")
            series.add(key)
            family.samples.append((sample_name, labels, value))
        except _Violation as exc:
            errors.append(f"line {number}: {exc}")
    for family in families.values():
        if family.type == "histogram":
            errors.extend(_check_histogram(family))
    return families, errors


def check_exposition(text: str) -> list[str]:
    """Every violation of the text format's rules on the page (empty if valid)."""
    return parse_exposition(text)[1]


def _family_of(sample_name: str, families: dict[str, ExpositionFamily], current: str | None) -> str:
    """The family a sample belongs to: the open family if the name fits it,
    else a declared family it is a suffixed sample of, else its own name."""
    candidates = [current] if current is not None else []
    candidates += [sample_name[: -len(s)] for s in ("_bucket", "_sum", "_count") if sample_name.endswith(s)]
    for name in candidates:
        family = families.get(name)
        if family is not None and sample_name[len(name):] in _SUFFIXES[family.type] \
                and sample_name.startswith(name):
            return name
    return sample_name


def _parse_sample(line: str) -> tuple[str, Labels, float]:
    match = _METRIC_NAME.match(line)
    if match is None:
        raise _Violation(f"invalid metric name at the start of {line[:40]!r}")
    name = match.group()
    position = match.end()
    labels: list[tuple[str, str]] = []
    if position < len(line) and line[position] == "{":
        labels, position = _parse_labels(line, position + 1)
    rest = line[position:]
    if not rest.startswith((" ", "\t")):
        raise _Violation(f"expected a space and a value after {name!r}")
    fields = rest.split()
    if not 1 <= len(fields) <= 2:
        raise _Violation(f"expected a value and an optional timestamp, got {rest.strip()!r}")
    value = _parse_value(fields[0])
    if len(fields) == 2 and not re.fullmatch(r"-?[0-9]+", fields[1]):
        raise _Violation(f"invalid timestamp {fields[1]!r}")
    names = [label for label, _ in labels]
    if len(set(names)) != len(names):
        raise _Violation(f"a label given twice in {name}")
    return name, tuple(labels), value


def _parse_labels(line: str, position: int) -> tuple[list[tuple[str, str]], int]:
    labels: list[tuple[str, str]] = []
    while True:
        while position < len(line) and line[position] in " \t":
            position += 1
        if position < len(line) and line[position] == "}":
            return labels, position + 1
        match = _LABEL_NAME.match(line, position)
        if match is None:
            raise _Violation(f"invalid label name at column {position + 1}")
        label = match.group()
        if label.startswith("__"):
            raise _Violation(f"label name {label!r} is reserved (starts with __)")
        position = match.end()
        if line[position:position + 2] != '="':
            raise _Violation(f'expected =" after label {label!r}')
        position += 2
        value: list[str] = []
        while True:
            if position >= len(line):
                raise _Violation(f"unterminated value of label {label!r}")
            char = line[position]
            if char == "\\":
                escaped = line[position + 1:position + 2]
                if escaped not in ('\\', '"', "n"):
                    raise _Violation(f"invalid escape \\{escaped} in label {label!r}")
                value.append("\n" if escaped == "n" else escaped)
                position += 2
            elif char == '"':
                position += 1
                break
            else:
                value.append(char)
                position += 1
        labels.append((label, "".join(value)))
        if position < len(line) and line[position] == ",":
            position += 1
        elif position >= len(line) or line[position] != "}":
            raise _Violation(f"expected , or }} after label {label!r}")


def _parse_value(text: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    if text == "NaN":
        return math.nan
    if not re.fullmatch(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?", text):
        raise _Violation(f"invalid value {text!r}")
    return float(text)


def _check_histogram(family: ExpositionFamily) -> list[str]:
    errors = []
    by_series: dict[Labels, dict[str, object]] = {}
    for sample_name, labels, value in family.samples:
        suffix = sample_name[len(family.name):]
        base = tuple(sorted((k, v) for k, v in labels if not (suffix == "_bucket" and k == "le")))
        entry = by_series.setdefault(base, {"buckets": []})
        if suffix == "_bucket":
            le = dict(labels)["le"]
            try:
                bound = _parse_value(le)
            except _Violation:
                errors.append(f"{family.name}{dict(base)}: invalid le {le!r}")
                continue
            entry["buckets"].append((bound, value))      # type: ignore[union-attr]
        else:
            entry[suffix] = value
    for base, entry in by_series.items():
        where = f"{family.name}{dict(base)}"
        buckets: list[tuple[float, float]] = entry["buckets"]      # type: ignore[assignment]
        if not buckets:
            errors.append(f"{where}: no buckets")
            continue
        if [b for b, _ in buckets] != sorted(b for b, _ in buckets):
            errors.append(f"{where}: buckets not in increasing order of le")
        counts = [c for _, c in sorted(buckets)]
        if any(later < earlier for earlier, later in zip(counts, counts[1:])):
            errors.append(f"{where}: bucket counts decrease (they are cumulative)")
        if sorted(buckets)[-1][0] != math.inf:
            errors.append(f"{where}: no le=\"+Inf\" bucket")
        if "_count" not in entry:
            errors.append(f"{where}: no _count")
        elif sorted(buckets)[-1][0] == math.inf and sorted(buckets)[-1][1] != entry["_count"]:
            errors.append(f"{where}: the +Inf bucket differs from _count")
        if "_sum" not in entry:
            errors.append(f"{where}: no _sum")
    return errors
