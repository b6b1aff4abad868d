"""Changing the users and roles: read the rules from the metadata group,
change them, compare-and-set them back; on a conflict (another operator's
change landed in between) read again and redo the change on what is stored.

Every change is stated as the state wanted ("alice holds role r"), so a
command run twice at once, or killed and run again, ends in the same rules:
a change already made is reported as such (`changed` False), not refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..placement.directory import ShardDirectory
from .rules import AUTH_KEY, AccessRules

#: Conflicting writers each redo their change on what they find; beyond this
#: many conflicts in a row something else is wrong.
_MAX_CONFLICTS = 50


@dataclass(frozen=True, slots=True)
class Outcome:
    rules: AccessRules
    changed: bool


class AccessAdmin:
    def __init__(self, directory: ShardDirectory) -> None:
        self.directory = directory

    async def load(self) -> AccessRules:
        return AccessRules.decode(await self.directory.read(AUTH_KEY))

    async def change(self, how: Callable[[AccessRules], AccessRules]) -> Outcome:
        """Apply `how` to the stored rules until the compare-and-set lands.
        `how` raises AccessRulesError when the change cannot be made (no such
        user): nothing is written then."""
        raw = await self.directory.read(AUTH_KEY)
        for _ in range(_MAX_CONFLICTS):
            current = AccessRules.decode(raw)
            wanted = how(current)
            if wanted is current:
                return Outcome(current, False)
            swapped, stored = await self.directory.compare_and_set(AUTH_KEY, raw, wanted.encode())
            if swapped:
                return Outcome(wanted, True)
            raw = stored
        raise RuntimeError(f"the access rules kept changing under {_MAX_CONFLICTS} attempts to change them")
