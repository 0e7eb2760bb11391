"""Executors decide how the stages of captioning (load frames -> encode -> decode) are scheduled."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

Stage = Callable[[Any], Any]


class SequentialExecutor:
    """Each item passes through every stage before the next item starts. Results in input order."""

    name = "sequential"

    def map(self, items: Iterable[Any], stages: Sequence[Stage]) -> Iterator[Any]:
        for item in items:
            for stage in stages:
                item = stage(item)
            yield item
