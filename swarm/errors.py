"""Typed errors of the network layer (transport, DHT, routing).

Each is a ``protocol.errors.SwarmError`` whose one-line message says what went wrong
and what to do about it. A handler that raises one of these answers the request with
an ``ERROR`` carrying its ``code`` (spec/SPEC.md, "Error codes"); the codes below are
chosen so that the receiver of such an ``ERROR`` reacts sensibly: ``SPAN_NOT_SERVED``
means "route elsewhere"; a peer this side could not reach or that did not answer is
``INTERNAL`` (a failure on the server's side of the request), never a 1xx code, which
would tell the receiver that *its* connection violated the protocol.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, SwarmError

__all__ = ["InvalidAddress", "PeerUnreachable", "RequestTimeout", "NoRoute"]


def _short_id(peer_id: bytes | None) -> str:
    return "" if peer_id is None else f" ({peer_id.hex()[:12]})"


class InvalidAddress(SwarmError):
    """A peer address that is not ``host:port`` or ``[ipv6]:port``."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(self, text: object, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid peer address {text!r}: {reason}; write it as host:port or [ipv6]:port")


class PeerUnreachable(SwarmError):
    """A peer could not be connected to, failed the handshake, or its connection was lost.

    The underlying error (``OSError``, ``HandshakeError``, ``ConnectionClosed``, ...) is
    kept as ``__cause__``; ``reason`` says it in words.
    """

    code = ErrorCode.INTERNAL

    def __init__(self, address: object, reason: str, *, peer_id: bytes | None = None) -> None:
        self.address = str(address)
        self.reason = reason
        self.peer_id = peer_id
        super().__init__(
            f"peer {address}{_short_id(peer_id)} is unreachable: {reason}; "
            "check that it is running and reachable, or use another peer"
        )


class RequestTimeout(SwarmError):
    """A request got no response within its deadline (the connection stays open)."""

    code = ErrorCode.INTERNAL

    def __init__(self, request: str, address: object, timeout: float, *, peer_id: bytes | None = None) -> None:
        self.request = request
        self.address = str(address)
        self.timeout = timeout
        self.peer_id = peer_id
        super().__init__(
            f"{request} to peer {address}{_short_id(peer_id)} got no answer within {timeout:g} s; "
            "retry later, raise the timeout, or use another peer"
        )


class NoRoute(SwarmError):
    """No known peer serves the blocks ``[start, end)`` of the model.

    The message names them inclusively (``blocks 3..5`` for ``[3, 6)``), as people count.
    """

    code = ErrorCode.SPAN_NOT_SERVED

    def __init__(self, start: int, end: int, *, model: str | None = None, retry_in: float | None = None) -> None:
        self.start = start
        self.end = end
        self.model = model
        # Set when the blocks are announced, but only by peers this client backs off after
        # they failed: the soonest one may be tried again in ``retry_in`` seconds.
        self.retry_in = retry_in
        of_model = f" of {model}" if model else ""
        if retry_in is None:
            what = "are not served"
        else:
            what = f"are served only by peers that failed recently (the next is retried in {retry_in:.0f} s)"
        super().__init__(
            f"no route: blocks {start}..{end - 1}{of_model} {what}; "
            f"wait for peers to announce them or start one with `swarm-peer serve --blocks {start}:{end}`"
        )
