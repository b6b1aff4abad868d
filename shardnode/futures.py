"""Settling asyncio futures that several parties may race to settle."""

from __future__ import annotations

import asyncio


def settle(future: asyncio.Future, outcome: object) -> None:
    """Set `outcome` as the future's exception (if it is one) or result,
    unless the future is already done (answered, failed or cancelled)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
