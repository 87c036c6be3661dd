"""Dataclass settings read from YAML tables (the motion and degradation configs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


def settings_from_mapping(cls: type[T], values: Mapping | T, what: str) -> T:
    """``cls(**values)`` with YAML lists as tuples; an instance of ``cls`` passes through.

    Raises:
        ValueError: naming the unknown keys and the known ones (``what`` says whose).
    """
    if isinstance(values, cls):
        return values
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {what} settings {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
