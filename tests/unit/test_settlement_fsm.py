"""The settlement state machine: the Python table equals the SQL migration's, illegal
transitions raise, terminal states have no exits."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

import facilitator
from facilitator.invariant import InvariantViolation
from facilitator.core.settlement import (
    IN_FLIGHT, SETTLED, TERMINAL, TRANSITIONS, State, can_transition, require_transition,
)

MIGRATIONS = Path(facilitator.__file__).parent / "adapters" / "migrations"
MIGRATION = MIGRATIONS / "001_settlements.sql"


def _sql_function_body(name: str) -> str:
    """The definition in force: the last CREATE [OR REPLACE] FUNCTION across the migrations."""
    bodies = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        bodies += re.findall(rf"CREATE (?:OR REPLACE )?FUNCTION {name}\(.*?\$\$(.*?)\$\$",
                             path.read_text(), re.S)
    assert bodies, f"{name} not found in the migrations"
    return bodies[-1]


def _sql_transitions() -> set[tuple[str, str]]:
    body = _sql_function_body("settlement_transition_allowed")
    pairs = set(re.findall(r"\(\s*'([a-z_]+)'\s*,\s*'([a-z_]+)'\s*\)", body))
    assert pairs, "no transition pairs parsed"
    return pairs


def _sql_states() -> set[str]:
    match = re.search(r"settlements_state_valid CHECK \(\s*state IN \(([^)]*)\)",
                      MIGRATION.read_text())
    assert match
    return set(re.findall(r"'([a-z_]+)'", match.group(1)))


def _python_transitions() -> set[tuple[str, str]]:
    return {(str(a), str(b)) for a, targets in TRANSITIONS.items() for b in targets}


def test_python_table_equals_sql_function() -> None:
    assert _python_transitions() == _sql_transitions()


def test_states_equal_sql_check_constraint() -> None:
    assert {s.value for s in State} == _sql_states()


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(State)


ALL_PAIRS = list(itertools.product(State, State))


@pytest.mark.parametrize(("current", "target"),
                         [p for p in ALL_PAIRS if p[1] not in TRANSITIONS[p[0]]],
                         ids=lambda s: str(s))
def test_illegal_transition_raises_invariant_violation(current: State, target: State) -> None:
    assert not can_transition(current, target)
    with pytest.raises(InvariantViolation):
        require_transition(current, target)


@pytest.mark.parametrize(("current", "target"),
                         [p for p in ALL_PAIRS if p[1] in TRANSITIONS[p[0]]],
                         ids=lambda s: str(s))
def test_legal_transition_is_allowed(current: State, target: State) -> None:
    assert can_transition(current, target)
    require_transition(current, target)


def test_no_self_transitions() -> None:
    assert all(state not in TRANSITIONS[state] for state in State)


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_have_no_exits(state: State) -> None:
    assert TRANSITIONS[state] == frozenset()


def test_terminal_set_is_exactly_the_states_without_exits() -> None:
    assert TERMINAL == {s for s, targets in TRANSITIONS.items() if not targets}


def test_every_state_is_reachable_from_pending() -> None:
    seen, frontier = {State.PENDING}, [State.PENDING]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()] - seen:
            seen.add(nxt)
            frontier.append(nxt)
    assert seen == set(State)


def test_every_state_can_reach_a_terminal_state() -> None:
    for start in State:
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()] - seen:
                seen.add(nxt)
                frontier.append(nxt)
        assert seen & TERMINAL, start


def test_in_flight_settled_terminal_are_disjoint() -> None:
    assert not (IN_FLIGHT & SETTLED) and not (IN_FLIGHT & TERMINAL)


def test_invariant_violation_names_the_pair() -> None:
    with pytest.raises(InvariantViolation, match="confirmed -> signed"):
        require_transition(State.CONFIRMED, State.SIGNED)
