"""Assertions that stay on in production (`assert` is stripped under `python -O`).

An `InvariantViolation` is a programmer error, never an expected outcome: expected failures are
reason codes returned as data.
"""

from __future__ import annotations


class InvariantViolation(AssertionError):
    pass


def invariant(condition: object, message: str) -> None:
    if not condition:
        raise InvariantViolation(message)
