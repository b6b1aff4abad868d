"""How hard the property-based fuzz tests try: a bounded number of examples
in `make test`, many more with FUZZ_EXAMPLES=N (e.g. FUZZ_EXAMPLES=20000)."""

from __future__ import annotations

import os


def examples(default: int) -> int:
    """`default` examples, or FUZZ_EXAMPLES when it is set."""
    value = os.environ.get("FUZZ_EXAMPLES", "").strip()
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FUZZ_EXAMPLES must be a positive integer, not {value!r}")
    return int(value)
