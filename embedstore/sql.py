"""The two SQL text helpers every module that builds a query needs (one copy each)."""

from __future__ import annotations

__all__ = ["conjoin", "literal"]


def literal(text: object) -> str:
    """A SQL string literal: ``O'Brien`` -> ``'O''Brien'`` (the only escape standard SQL has)."""
    return "'" + str(text).replace("'", "''") + "'"


def conjoin(*predicates: str | None) -> str:
    """``(a) AND (b)`` of the non-empty predicates, each parenthesised so a user's ``x OR y``
    keeps its meaning; ``TRUE`` when there are none."""
    parts = [f"({p})" for p in predicates if p and p.strip()]
    return " AND ".join(parts) if parts else "TRUE"
