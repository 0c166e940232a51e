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


def test_error_code_table_matches_code():
    from protocol.errors import ErrorCode

    text = _text()
    for code in ErrorCode:
        assert f"| {code.value} | {code.name} |" in text, code
