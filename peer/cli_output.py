"""Terminal output of the client commands: streamed tokens and the log lines between them.

A warning (a hop failed, the chain is re-routed) can arrive while an answer is being
streamed. Written at once it would land in the middle of the streamed line; so while a
stream has an unfinished line, ``HeldLogHandler`` keeps records back and
``TokenPrinter`` releases them when the stream reaches a line's end (or finishes), the
text itself untouched.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["HeldLogHandler", "TokenPrinter", "JsonLinesPrinter", "install_cli_logging"]


class HeldLogHandler(logging.StreamHandler):
    """A stream handler that holds records while ``hold`` is set (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._follow_stderr = stream is None  # sys.stderr as it is at each record
        self.hold = False
        self._held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow_stderr:
            self.stream = sys.stderr
        if self.hold:
            self._held.append(record)
        else:
            super().emit(record)

    def let_out(self) -> None:
        """Emit the held records (``release`` is taken: it is the handler lock's)."""
        held, self._held = self._held, []
        for record in held:
            super().emit(record)


class _CliFormatter(logging.Formatter):
    """``swarm-peer: warning: ...`` for people; timestamps and logger names with -v."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s" if verbose else None)
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        return f"swarm-peer: {record.levelname.lower()}: {record.getMessage()}"


def install_cli_logging(verbose: bool) -> HeldLogHandler:
    """The root logger's handler for people (WARNING and up; DEBUG with ``-v``)."""
    root = logging.getLogger()
    handler = _cli_handler()
    if handler is None:  # once per process (tests call main() more than once)
        handler = HeldLogHandler()
        root.addHandler(handler)
    handler.setFormatter(_CliFormatter(verbose))
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    return handler


def _cli_handler() -> HeldLogHandler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, HeldLogHandler)), None)


class TokenPrinter:
    """Writes streamed text to ``out`` and keeps log records off unfinished lines."""

    def __init__(self, out: TextIO | None = None, handler: HeldLogHandler | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.handler = handler if handler is not None else _cli_handler()
        self.started = False
        self.at_line_start = True

    def write(self, text: str) -> None:
        if not text:
            return
        self.started = True
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n")
        if self.handler is not None:
            self.handler.hold = not self.at_line_start
            if self.at_line_start:
                self.handler.let_out()

    def token(self, event: Any) -> None:
        if event.rewind:  # an audit rejected tokens already shown: say so on a line of its own
            self.finish_line()
            logging.getLogger("swarm.client").warning(
                "an audit rejected the last %d token(s) shown; the answer continues from the verified point",
                event.rewind)
        self.write(event.text)

    def finish_line(self) -> None:
        """End the streamed line (if one is open) and let held records out."""
        if self.started and not self.at_line_start:
            self.out.write("\n")
            self.out.flush()
            self.at_line_start = True
        if self.handler is not None:
            self.handler.hold = False
            self.handler.let_out()


class JsonLinesPrinter:
    """``--json``: one JSON object per line: a ``token`` per token, then the ``result``."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stdout

    def _line(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()

    def token(self, event: Any) -> None:
        self._line({"type": "token", "index": event.index, "token_id": event.token_id, "text": event.text,
                    "rewind": event.rewind, "time": time.time()})

    def result(self, result: Any, **extra: Any) -> None:
        self._line({"type": "result", **result.to_dict(), **extra})

    def finish_line(self) -> None:
        pass
