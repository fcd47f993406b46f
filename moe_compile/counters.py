"""Rewrite counters: every pass and rewrite bumps one, and tests assert them (like Inductor's `counters`)."""

from __future__ import annotations

import collections

counters: collections.defaultdict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def reset() -> None:
    counters.clear()
