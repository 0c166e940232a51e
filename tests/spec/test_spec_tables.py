"""spec/SPEC.md's tables must say exactly what the code does."""

from pathlib import Path

SPEC = Path(__file__).resolve().parents[2] / "spec"


def _text():
    return (SPEC / "SPEC.md").read_text()


def test_message_registry_matches_code(generator):
    assert generator.registry_markdown() in _text()


def test_budget_table_matches_code(generator):
    assert generator.budget_markdown() in _text()


def test_session_state_table_matches_code(generator):
    assert generator.session_table_markdown() in _text()


def _table_after(header: str) -> set[tuple[str, ...]]:
    lines = _text().split(header, 1)[1].split("\n")[2:]  # skip the header and |---| lines
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip().strip("`") for cell in line.strip("|").split("|")))
    return set(rows)


def test_handshake_state_table_matches_code():
    from protocol import HANDSHAKE_TRANSITIONS

    expected = {(r.name, s.name, e.name, n.name) for (r, s, e), n in HANDSHAKE_TRANSITIONS.items()}
    assert _table_after("| role | state | event | next state |") == expected


def test_error_code_table_matches_code(generator):
    from protocol.errors import ERROR_RULES, ErrorCode

    assert set(ERROR_RULES) == set(ErrorCode), "every code needs its rule (protocol.errors.ERROR_RULES)"
    assert generator.error_table_markdown() in _text()
    rows = _table_after("| code | name | meaning | detected by | reported as | connection | `retry_after` |")
    expected = {(str(code.value), code.name, rule.meaning.replace("`", ""), rule.detected_by, rule.report.value,
                 "ends" if rule.ends_connection else "stays open", "MAY" if rule.retry_after else "-")
                for code, rule in ERROR_RULES.items()}
    assert {tuple(cell.replace("`", "") for cell in row) for row in rows} == expected


def test_the_error_rule_is_one_rule():
    # A code either answers a request (the connection stays) or ends the connection
    # (never an answer): no code does both, and the answer codes are exactly those an
    # ERROR may carry with a request's id.
    from protocol.errors import ERROR_RULES, Report

    for code, rule in ERROR_RULES.items():
        assert rule.ends_connection == (rule.report is not Report.ANSWER), code
        assert not (rule.retry_after and rule.ends_connection), code
