"""Internals of ``swarm.transport``: the per-connection trio adapter."""

from ._peer import RECEIVE_SIZE, Handler, PeerConnection

__all__ = ["PeerConnection", "Handler", "RECEIVE_SIZE"]
