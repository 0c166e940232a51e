"""The span executor: blocks [start, end) of a model, with KV-cache inference sessions.

Theory of operation. A session is a per-span ``DynamicCache`` (``peer.runtime._kv``:
its layers append in place) plus its length. A ``forward`` of n >= 1 tokens at
``position`` (at most the session's length) extends the cache by n: prefill and
decode are the same call. A position below the length is a rollback (speculative
decoding, spec 11.1): the cache is cut there (``crop``) when the step's first piece
runs, so a step refused or abandoned before computing leaves the session as it was.
Position ids, rotary embeddings and causal/sliding masks are computed exactly as the
full model computes them for those positions, with transformers' own functions, so
the chain of spans reproduces the full model. ``forward_once`` runs a whole sequence
from position 0 with no cache (replays and audits). Both may be limited to a
sub-range [start, end) of the served blocks (a route may use only part of a peer's
span): such a session's cache has one slot per block it runs, and the attention
modules are pointed at their slot before each run.

A session here is compute only: a KV cache, the tokens it holds and the memory
reserved for it. The protocol's account of a session (steps, positions, the history
digest, the signed transcript) is ``protocol.SessionState``, which the server checks
before it calls ``forward``; the position and length checks here guard the cache
itself (a cache fed out of order or past its reservation would compute garbage), and
serve local callers (``generate_local``) that use no protocol at all.

Memory: each open session reserves ``max_length * per_token_cache_bytes`` against
``cache_bytes`` when it opens (an upper bound: the cache grows lazily, but a session
admitted must never fail for memory halfway through); a caller running a chunked
``forward_once_job`` reserves its cache the same way (``reserve``/``release``), and so
does a batch that builds an arena (``_kv``) for what the arena holds beyond its
sessions' reservations.

Pieces: ``forward_job`` and ``forward_once_job`` return a ``ForwardJob``, the same
computation cut into calls of bounded work, so that the server's scheduler can let a
decode step of another session in between (issue 10 item 4). A session's step is cut
by blocks only, which computes the same bits as one call; a long FORWARD_ONCE is also
cut by tokens (chunked prefill with a cache of its own). Sessions remember when they
were last used, read from ``clock`` (``time.monotonic`` by default); ``evict_idle(now)``
is pure in the time it is given.

Thread-safety: ``forward`` and ``forward_once`` may run in several threads at once
(a server computes up to ``--compute-slots`` steps concurrently) provided no two calls
for one session overlap (the server refuses a step of a session that is still
computing). What the calls share is guarded: the span's attention modules are told
which cache slot they write (``layer_idx``) before a session's run, so runs whose
sessions start at different blocks take turns (``_SlotGate``; runs of whole-span
sessions, the common case, all number the slots alike and overlap freely), and the
rotary embedding, which some rope types update in place, runs under a lock.
Opening, closing and evicting sessions happen on one thread (the server's).
"""

from __future__ import annotations

import copy
import functools
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ._batch import BATCHED_ATTENTION, BatchJob, SessionStep, crop_cache
from ._errors import (
    InvalidArgument,
    MaxLengthExceeded,
    PositionMismatch,
    SessionMemoryExhausted,
    UnknownSession,
)
from ._loader import SpanModules
from ._packed import dense_copy
from ._model_id import ModelInfo

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["SpanExecutor", "SessionsInfo", "ForwardJob", "SessionStep", "measure_throughput"]

SESSION_ID_BYTES = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionsInfo:
    """Status of the executor's sessions (for ``swarm-peer status`` and announcements)."""

    count: int
    tokens: int  # tokens held in caches, summed over sessions
    reserved_bytes: int  # cache memory reserved by open sessions
    budget_bytes: int | None  # the cache budget (None: unlimited)


@dataclass(slots=True)
class _Session:
    max_length: int
    cache: object  # a DynamicCache (_kv.session_cache), one slot per block of [lo, hi)
    length: int
    reserved: int
    lo: int  # the session's blocks, as local indices into the span's layers
    hi: int
    last_used: float


class _SlotGate:
    """Lets runs share the span's layers while they number the cache slots alike.

    A run of a session whose blocks start ``offset`` blocks into the span points every
    layer's attention at slot ``layer - offset``; runs with one offset write the same
    numbers and may overlap, a run with another offset waits until they are done. Once
    one waits, no new run of the current offset joins, so nobody waits for ever.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._offset = 0
        self._running = 0
        self._draining = False

    @contextmanager
    def hold(self, offset: int) -> Iterator[None]:
        with self._cond:
            while self._running and (self._offset != offset or self._draining):
                if self._offset != offset:
                    self._draining = True
                self._cond.wait()
            self._offset = offset
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                if not self._running:
                    self._draining = False
                    self._cond.notify_all()


class ForwardJob:
    """One forward computed in pieces: ``pieces`` is a list of ``(work, fn)``, each ``fn``
    a call (for a worker thread) computing at most ``quantum`` work units (tokens x
    blocks, at least one block of one chunk), to be called in order, one at a time;
    ``result`` is the output once all have run. ``run`` calls them all here.

    The pieces cut a run by blocks (and, for a chunked FORWARD_ONCE, by tokens first):
    masks and rotary embeddings are made once per chunk, and a block computes exactly
    what it computes in one call, so a session's step is the same bits either way.
    Each piece enters inference mode itself (it is thread-local) and holds the slot gate
    only while it runs, so other sessions' pieces interleave with it. The pieces refer
    to the run's state, never to the job, so that a job (and the cache it may hold) is
    freed as soon as it is dropped, not at the next cycle collection.
    """

    def __init__(self, executor: SpanExecutor, hidden: torch.Tensor, position: int, cache: object | None,
                 lo: int, hi: int, *, quantum: int | None, chunk_tokens: int | None,
                 on_done: Callable[[], None] | None, crop: bool = False) -> None:
        n = hidden.shape[1]
        self.tokens = n
        self.blocks = hi - lo
        step = chunk_tokens or n
        chunks = [(a, min(a + step, n)) for a in range(0, n, step)]
        state = self._state = _Run(executor, hidden, position, cache, lo, hi, len(chunks), on_done)
        state.crop = crop
        self.pieces: list[tuple[int, Callable[[], None]]] = []
        for index, (a, b) in enumerate(chunks):
            group = self.blocks if quantum is None else max(1, min(self.blocks, quantum // (b - a)))
            for first in range(lo, hi, group):
                last = min(first + group, hi)
                self.pieces.append(((b - a) * (last - first), functools.partial(state.piece, index, a, b, first, last)))
        state.total = len(self.pieces)

    @property
    def work(self) -> int:
        return self.tokens * self.blocks

    @property
    def pieces_done(self) -> int:
        return self._state.done

    def run(self) -> torch.Tensor:
        """Compute every piece now (in this thread) and return the output."""
        for _, piece in self.pieces:
            piece()
        return self.result()

    def result(self) -> torch.Tensor:
        """The span's output, once every piece has run."""
        state = self._state
        if state.done != state.total:
            raise RuntimeError(f"{state.total - state.done} pieces of the forward have not run")
        outputs = [o for o in state.outputs if o is not None]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class _Run:
    """What a ``ForwardJob``'s pieces share: the input, the cache, the chunk in flight."""

    __slots__ = ("ex", "hidden", "position", "cache", "lo", "hi", "on_done", "outputs", "x", "prepared", "done",
                 "total", "crop")

    def __init__(self, ex: SpanExecutor, hidden: torch.Tensor, position: int, cache: object | None, lo: int,
                 hi: int, chunks: int, on_done: Callable[[], None] | None) -> None:
        self.ex, self.hidden, self.position, self.cache, self.lo, self.hi = ex, hidden, position, cache, lo, hi
        self.on_done = on_done
        self.outputs: list[torch.Tensor | None] = [None] * chunks
        self.x: torch.Tensor | None = None
        self.prepared: tuple | None = None
        self.done = 0
        self.total = 0
        self.crop = False  # a rollback: cut the cache at ``position`` before the first piece

    def piece(self, index: int, a: int, b: int, first: int, last: int) -> None:
        ex = self.ex
        with torch.inference_mode():
            if first == self.lo:
                if self.crop and a == 0:
                    crop_cache(self.cache, self.position)
                    self.crop = False
                x = self.hidden[:, a:b].to(device=ex.device, dtype=ex.dtype)
                self.prepared = ex._prepare(x, self.position + a, self.cache, self.lo, self.hi)
            else:
                assert self.x is not None
                x = self.x
            assert self.prepared is not None
            if self.cache is not None:
                with ex._gate.hold(self.lo):
                    x = ex._run_layers(x, self.prepared, self.cache, self.lo, first, last)
            else:
                x = ex._run_layers(x, self.prepared, None, self.lo, first, last)
            self.x = x
            if last == self.hi:
                self.outputs[index] = x
                self.x = None
        self.done += 1
        if self.done == self.total:
            self.prepared = None
            self.hidden = None  # type: ignore[assignment]
            if self.on_done is not None:
                self.on_done()


class SpanExecutor:
    """Runs blocks [start, end) of one model; see the module docstring.

    Build one with :func:`peer.runtime.load_span`.
    """

    def __init__(
        self,
        *,
        modules: SpanModules,
        info: ModelInfo,
        start: int,
        end: int,
        device: torch.device,
        dtype: torch.dtype,
        quant: str | None = None,
        cache_bytes: int | None = None,
        idle_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_bytes is not None and cache_bytes < 0:
            raise InvalidArgument(f"cache_bytes must be >= 0, got {cache_bytes}")
        if idle_timeout <= 0:
            raise InvalidArgument(f"idle_timeout must be > 0 seconds, got {idle_timeout}")
        self.info = info
        self.model_id = info.model_id
        self.start = start
        self.end = end
        self.hidden_size = info.hidden_size
        self.device = device
        self.dtype = dtype
        self.quant = quant
        self.cache_bytes = cache_bytes
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._layers = modules.layers
        self._rotary = modules.rotary
        self._config = modules.config
        self._layer_types = _layer_types(modules.config)
        self._sessions: dict[bytes, _Session] = {}
        self._transient = 0  # cache budget taken by chunked forward_once jobs and batch arenas (_kv)
        # Guards the budget: batches reserve arenas on compute threads, and an arena's
        # hold is given back by a finalizer on whichever thread drops it last.
        self._budget = threading.RLock()
        # the sessions of recent batches -> how many batches they made (_batch: when to build an arena)
        self._batch_members: dict[frozenset[int], int] = {}
        self._gate = _SlotGate()
        self._rotary_lock = threading.Lock()
        self.per_token_cache_bytes = _per_token_bytes(modules.config, dtype)

    # -- sessions ------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Number of blocks served (end - start)."""
        return self.end - self.start

    @property
    def context_length(self) -> int | None:
        """The model's context (``max_position_embeddings``), if its config says."""
        limit = getattr(self._config, "max_position_embeddings", None)
        return int(limit) if limit is not None else None

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The span's decoder blocks (transformers modules), in order."""
        return self._layers

    @property
    def weight_bytes(self) -> int:
        """Memory held by the span's weights (after any quantization)."""
        return sum(p.numel() * p.element_size() for p in self._layers.parameters())

    @property
    def sessions(self) -> SessionsInfo:
        """Counts for status reports."""
        return SessionsInfo(
            count=len(self._sessions),
            tokens=sum(s.length for s in self._sessions.values()),
            reserved_bytes=self._reserved(),
            budget_bytes=self.cache_bytes,
        )

    def session_length(self, session_id: bytes) -> int:
        """Tokens already in the session's cache (the next ``forward``'s position)."""
        return self._get(session_id).length

    def open_session(self, max_length: int, *, start: int | None = None, end: int | None = None) -> bytes:
        """Open a session able to hold ``max_length`` tokens; returns its 16-byte id.

        ``start``/``end`` (absolute block indices, default the whole span) pick a
        sub-range of the served span: the session runs only those blocks.

        Raises:
            InvalidArgument: ``max_length`` < 1, or a sub-range outside the span.
            MaxLengthExceeded: longer than the model's context (max_position_embeddings).
            SessionMemoryExhausted: the cache budget cannot reserve it now.
        """
        from ._kv import session_cache  # imports transformers: on first use

        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise InvalidArgument(f"max_length must be a positive integer, got {max_length!r}")
        limit = getattr(self._config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise MaxLengthExceeded(f"max_length {max_length} exceeds the model's context of {limit} tokens")
        lo, hi = self._local_range(start, end)
        need = self._cache_bytes(max_length, lo, hi)
        cache = session_cache(self._sub_config(lo, hi), max_length)
        session_id = secrets.token_bytes(SESSION_ID_BYTES)
        with self._budget:
            if self.cache_bytes is not None:
                free = self.cache_bytes - self._reserved()
                if need > free:
                    raise SessionMemoryExhausted(
                        f"cache budget full: a session of {max_length} tokens needs {need} bytes, "
                        f"{free} of {self.cache_bytes} are free; use a smaller max_length or retry later"
                    )
            self._sessions[session_id] = _Session(max_length=max_length, cache=cache, length=0, reserved=need,
                                                  last_used=self._clock(), lo=lo, hi=hi)
        return session_id

    def close_session(self, session_id: bytes) -> None:
        """Free a session's cache. Raises :class:`UnknownSession` if it is not open."""
        self._get(session_id)
        self._drop(session_id)

    def evict_idle(self, now: float) -> list[bytes]:
        """Close sessions unused for longer than ``idle_timeout`` at time ``now``; return their ids."""
        stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout]
        for sid in stale:
            self._drop(sid)
        return stale

    def _drop(self, session_id: bytes) -> None:
        """Forget a session. A row it leaves in a batch arena (``_kv``) stays reserved, its
        reservation's worth, until the arena is freed."""
        from ._kv import arena_of

        with self._budget:
            session = self._sessions.pop(session_id)
            arena = arena_of(session.cache)
            if arena is not None:
                self._transient += session.reserved
                self._release_with(arena, session.reserved)

    def _release_with(self, holder: object, nbytes: int) -> None:
        """Give ``nbytes`` of the budget back once ``holder`` is freed."""
        weakref.finalize(holder, self.release, nbytes)

    def _cache_bytes(self, tokens: int, lo: int, hi: int) -> int:
        """What ``tokens`` tokens of cache take over local blocks [lo, hi) (reservations)."""
        return tokens * self.per_token_cache_bytes * (hi - lo) // self.num_blocks

    # -- compute -------------------------------------------------------------------------

    def forward(self, session_id: bytes, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Run ``hidden`` [1, n, hidden_size] through the span at positions position..position+n-1.

        Returns the span's output hidden states, same shape, in the span's dtype on its
        device. A rejected call (any of the errors below) leaves the session unchanged.

        Raises:
            UnknownSession, PositionMismatch, MaxLengthExceeded, InvalidArgument.
        """
        return self.forward_job(session_id, hidden, position).run()

    def forward_job(self, session_id: bytes, hidden: torch.Tensor, position: int, *,
                    quantum: int | None = None, chunk_tokens: int | None = None) -> ForwardJob:
        """``forward`` as a ``ForwardJob``: pieces of at most ``quantum`` work units
        (whole blocks: a step of at most ``chunk_tokens`` tokens is never cut by tokens,
        so its output is bit for bit the one-call output; a longer one, a long prefill, is
        computed ``chunk_tokens`` at a time into the session's cache, equal to the one
        call up to float rounding as a chunked ``forward_once_job`` is, so that its
        scratch memory does not grow with the square of its length). Checks as
        ``forward`` does, at once; the session advances when the last piece is done. If
        the job is abandoned half-way the session's cache is inconsistent: close the
        session.
        """
        step = self.check_step(session_id, hidden, position)
        session, n = step.session, step.tokens

        def done() -> None:
            session.length = position + n
            session.last_used = self._clock()

        chunked = chunk_tokens is not None and n > chunk_tokens
        return ForwardJob(self, hidden, position, session.cache, session.lo, session.hi, quantum=quantum,
                          chunk_tokens=chunk_tokens if chunked else None, on_done=done,
                          crop=position < session.length)

    def check_step(self, session_id: bytes, hidden: torch.Tensor, position: int) -> SessionStep:
        """The checks of ``forward`` (same errors), done now: the step, for ``forward_batch``."""
        session = self._get(session_id)
        n = self._check_hidden(hidden)
        if not isinstance(position, int) or not 0 <= position <= session.length:
            raise PositionMismatch(
                f"position {position} is past the session's length {session.length}; "
                f"send a position of at most {session.length}"
            )
        if position + n > session.max_length:
            raise MaxLengthExceeded(
                f"{position} + {n} tokens exceed the session's max_length {session.max_length}; "
                "open a new session with a larger max_length"
            )
        if position < session.length:
            _check_croppable(session.cache, position)
        return SessionStep(session_id=session_id, session=session, hidden=hidden, position=position)

    def forward_batch(self, steps: Sequence[SessionStep]) -> list[torch.Tensor]:
        """Compute checked steps of different sessions (``check_step``) in one forward and
        return their outputs in order; each equals the step computed alone up to float
        rounding (``peer.runtime._batch``), one step alone is the ``forward`` path bit
        for bit. The sessions advance. If it raises half-way, the sessions of the steps
        whose ``started`` is set hold half a step: close them.

        Raises:
            InvalidArgument: no steps, a session twice, or steps over different blocks.
            PositionMismatch: a step no longer continues its session.
        """
        if not steps:
            raise InvalidArgument("forward_batch needs at least one step")
        if len({id(s.session) for s in steps}) != len(steps):
            raise InvalidArgument("a batch holds at most one step of each session")
        lo, hi = steps[0].session.lo, steps[0].session.hi
        for s in steps:
            if (s.session.lo, s.session.hi) != (lo, hi):
                raise InvalidArgument("the steps of one batch must run the same blocks")
            if s.position > s.session.length:
                raise PositionMismatch(f"position {s.position} is past the session's length "
                                       f"{s.session.length}; send a position of at most {s.session.length}")
        if len(steps) > 1 and getattr(self._config, "_attn_implementation", "sdpa") in BATCHED_ATTENTION:
            return BatchJob(self, steps).run()
        if len(steps) > 1:  # an attention that takes no 4-D mask: one step after the other
            return [self.forward_batch([step])[0] for step in steps]
        (step,) = steps
        session, n = step.session, step.tokens

        def done() -> None:
            session.length = step.position + n
            session.last_used = self._clock()
            step.finished = True

        step.started = True
        return [ForwardJob(self, step.hidden, step.position, session.cache, lo, hi, quantum=None,
                           chunk_tokens=None, on_done=done, crop=step.position < session.length).run()]

    def forward_once(self, hidden: torch.Tensor, *, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Run a whole sequence [1, n, hidden_size] from position 0 without any cache,
        through blocks [start, end) (default: the whole span)."""
        return self.forward_once_job(hidden, start=start, end=end).run()

    def forward_once_job(self, hidden: torch.Tensor, *, start: int | None = None, end: int | None = None,
                         quantum: int | None = None, chunk_tokens: int | None = None) -> ForwardJob:
        """``forward_once`` as a ``ForwardJob``. With ``chunk_tokens``, a sequence longer
        than that is computed ``chunk_tokens`` tokens at a time with a cache of its own
        (chunked prefill: the same function, equal to the one-call output up to float
        rounding, about 1e-6 relative), so that no piece is large; ``transient_bytes``
        is the cache memory that takes while the job runs."""
        lo, hi = self._local_range(start, end)
        n = self._check_hidden(hidden)
        limit = getattr(self._config, "max_position_embeddings", None)
        if limit is not None and n > limit:
            raise MaxLengthExceeded(f"{n} tokens exceed the model's context of {limit} tokens")
        chunked = chunk_tokens is not None and n > chunk_tokens
        cache = None
        if chunked:
            from ._kv import session_cache

            cache = session_cache(self._sub_config(lo, hi), n)
        return ForwardJob(self, hidden, 0, cache, lo, hi, quantum=quantum,
                          chunk_tokens=chunk_tokens if chunked else None, on_done=None)

    def forward_once_exact(self, hidden: torch.Tensor, *, start: int | None = None,
                           end: int | None = None) -> torch.Tensor:
        """``forward_once`` computed in float64: the near-exact answer that honest
        rounding scatters around, against which verification measures it (spec 13.3).

        Each block's weights are copied to float64 only while that block runs, so this
        needs one block's float64 copy of memory beyond the span. Returns float64.

        Raises:
            InvalidArgument: the span's weights are quantized (no float64 copy exists).
        """
        if self.quant is not None:
            raise InvalidArgument(f"a {self.quant}-quantized span has no float64 reference")
        twin = copy.copy(self)  # shares config, rotary and locks; no session is touched
        twin.dtype = torch.float64
        twin._layers = _Float64Blocks(self._layers)  # type: ignore[assignment]
        return twin.forward_once(hidden, start=start, end=end)

    def transient_bytes(self, n_tokens: int, *, start: int | None = None, end: int | None = None) -> int:
        """Cache memory a chunked ``forward_once_job`` of ``n_tokens`` holds while it runs
        (what ``reserve`` is asked for: the same budget as sessions)."""
        lo, hi = self._local_range(start, end)
        return self._cache_bytes(n_tokens, lo, hi)

    def reserve(self, nbytes: int) -> None:
        """Take ``nbytes`` of the cache budget for a transient use (``release`` gives them
        back). Raises SessionMemoryExhausted if they are not free."""
        with self._budget:
            if self.cache_bytes is not None:
                free = self.cache_bytes - self._reserved()
                if nbytes > free:
                    raise SessionMemoryExhausted(f"cache budget full: {nbytes} bytes needed, {free} of "
                                                 f"{self.cache_bytes} are free; retry later")
            self._transient += nbytes

    def release(self, nbytes: int) -> None:
        with self._budget:
            self._transient = max(0, self._transient - nbytes)

    def _prepare(self, x: torch.Tensor, position: int, cache: object | None, lo: int, hi: int) -> tuple:
        """Masks and rotary embeddings for a run of ``x`` at ``position`` (once per chunk)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        n = x.shape[1]
        position_ids = torch.arange(position, position + n, device=self.device).unsqueeze(0)
        mask_args = {
            "config": self._config,
            "inputs_embeds": x,
            "attention_mask": None,
            "cache": cache,
            "position_ids": position_ids,
        }
        kinds = self._layer_types[lo:hi]
        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = create_causal_mask(**mask_args)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        with self._rotary_lock:  # dynamic rope types update the module in place
            position_embeddings = self._rotary(x, position_ids)
        return position_ids, masks, position_embeddings

    def _run_layers(self, x: torch.Tensor, prepared: tuple, cache: object | None, lo: int, first: int,
                    last: int) -> torch.Tensor:
        """Layers [first, last) (local indices) of a run whose blocks start at ``lo``."""
        position_ids, masks, position_embeddings = prepared
        for index in range(first, last):
            layer = self._layers[index]
            if cache is not None:
                # A session's cache has one slot per block it runs, numbered from 0: point
                # each layer's attention at its slot (the span's own numbering when lo == 0).
                # Without a cache the attention never reads it. The caller holds the gate.
                # (setattr: torch types a submodule's attributes as Tensor | Module.)
                setattr(layer.self_attn, "layer_idx", index - lo)
            x = layer(
                x,
                attention_mask=masks[self._layer_types[index]],
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
        return x

    # -- helpers -------------------------------------------------------------------------

    def _get(self, session_id: bytes) -> _Session:
        session = self._sessions.get(session_id) if isinstance(session_id, bytes) else None
        if session is None:
            shown = session_id.hex() if isinstance(session_id, bytes) else repr(session_id)
            raise UnknownSession(f"no open session {shown} (closed, evicted or never opened); open a new one")
        return session

    def _local_range(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not (isinstance(start, int) and isinstance(end, int) and self.start <= start < end <= self.end):
            raise InvalidArgument(f"blocks [{start}, {end}) are not a sub-range of the served span "
                                  f"[{self.start}, {self.end})")
        return start - self.start, end - self.start

    def _sub_config(self, lo: int, hi: int) -> PretrainedConfig:
        """The span config restricted to local blocks [lo, hi) (for a session's cache)."""
        if (lo, hi) == (0, self.num_blocks):
            return self._config
        cfg = copy.copy(self._config)
        cfg.num_hidden_layers = hi - lo
        if getattr(self._config, "layer_types", None) is not None:
            cfg.layer_types = list(self._config.layer_types[lo:hi])
        return cfg

    def _reserved(self) -> int:
        with self._budget:
            return sum(s.reserved for s in self._sessions.values()) + self._transient

    def _check_hidden(self, hidden: torch.Tensor) -> int:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] != 1:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise InvalidArgument(f"hidden states must have shape [1, n, {self.hidden_size}], got {shape}")
        if hidden.shape[2] != self.hidden_size or hidden.shape[1] < 1:
            raise InvalidArgument(
                f"hidden states must have shape [1, n>=1, {self.hidden_size}], got {tuple(hidden.shape)}"
            )
        if not hidden.is_floating_point():
            raise InvalidArgument(f"hidden states must be floating point, got {hidden.dtype}")
        return int(hidden.shape[1])


class _Float64Blocks:
    """Blocks that are float64 copies only while iterated, one at a time (``forward_once_exact``)."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self._layers = layers

    def __getitem__(self, index: int) -> torch.nn.Module:
        return dense_copy(self._layers[index]).to(torch.float64)

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[torch.nn.Module]:
        for layer in self._layers:
            yield dense_copy(layer).to(torch.float64)


def _check_croppable(cache: object, position: int) -> None:
    """Raise unless the session's cache can be cut back to ``position``: a sliding-window
    layer that already dropped keys before the window cannot be (it no longer holds
    the keys a cut would have to bring back)."""
    for layer in getattr(cache, "layers", ()):
        window = getattr(layer, "sliding_window", None)
        if window is not None and layer.get_seq_length() >= window and position < layer.get_seq_length():
            raise PositionMismatch(f"a sliding-window session past its window of {window} tokens cannot roll "
                                   f"back to position {position}")


def _layer_types(config: object) -> list[str]:
    n = int(config.num_hidden_layers)  # type: ignore[attr-defined]
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    # Mistral: one sliding window for every layer when set (what MistralModel masks with).
    kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
    return [kind] * n


def _per_token_bytes(config: object, dtype: torch.dtype) -> int:
    heads = int(config.num_attention_heads)  # type: ignore[attr-defined]
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)  # type: ignore[attr-defined]
    layers = int(config.num_hidden_layers)  # type: ignore[attr-defined]
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * elem


def measure_throughput(
    executor: SpanExecutor, *, n_tokens: int = 16, prefill: int = 8, seed: int = 0
) -> float:
    """Decode tokens per second of ``executor``'s span (announced at server start).

    Opens a private session, prefills ``prefill`` random hidden states, then times
    ``n_tokens`` single-token decode steps. The session is closed afterwards even if a
    step fails. Ignores the cache budget (the probe is tiny and transient).
    """
    if n_tokens < 1 or prefill < 1:
        raise InvalidArgument("measure_throughput needs n_tokens >= 1 and prefill >= 1")
    gen = torch.Generator().manual_seed(seed)
    budget, executor.cache_bytes = executor.cache_bytes, None
    try:
        sid = executor.open_session(prefill + n_tokens)
    finally:
        executor.cache_bytes = budget
    try:
        x = torch.randn(1, prefill, executor.hidden_size, generator=gen)
        executor.forward(sid, x, 0)
        steps = [torch.randn(1, 1, executor.hidden_size, generator=gen) for _ in range(n_tokens)]
        if executor.device.type == "cuda":
            torch.cuda.synchronize(executor.device)
        t0 = time.perf_counter()
        for i, step in enumerate(steps):
            executor.forward(sid, step, prefill + i)
        if executor.device.type == "cuda":
            torch.cuda.synchronize(executor.device)
        elapsed = time.perf_counter() - t0
    finally:
        executor.close_session(sid)
    return n_tokens / max(elapsed, 1e-9)
