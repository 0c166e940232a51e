"""Internals of ``swarm.transport``: the per-connection request multiplexer."""

from ._peer import RECEIVE_SIZE, Handler, PeerConnection, error_response

__all__ = ["PeerConnection", "Handler", "RECEIVE_SIZE", "error_response"]
