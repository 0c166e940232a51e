"""Availability under failures (issue 12 items 1, 2, 3, 5; issue 10 item 7), with real
peers on loopback in this process: opening a route fails over like a step, every
failure path closes what it opened, failures are remembered across generations,
slow hops are hedged, and servers that lie in their announcements cost a probe, not
the generation. Every test ends with the servers' open-session counts back at 0."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import trio

import peer._chain as chain_module
from peer._chain import AllCandidatesFailed
from peer.api import Swarm
from peer.node import ServeOptions, run_server
from peer.server import SpanServer
from peer_helpers import reference, save_tiny_llama
from protocol import Identity
from protocol.errors import ErrorCode, RemoteError
from swarm.errors import NoRoute
from swarm.health import TimeoutPolicy

LAYERS = 6
PROMPT = [1, 5, 9, 33, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-availability")
    return str(path), save_tiny_llama(path, layers=LAYERS, max_positions=256, special_tokens=False)


async def start(nursery, model, blocks, bootstrap=(), server_class=None, monkeypatch=None, identity=None, **kw):
    options = ServeOptions(model=model, blocks=blocks, bootstrap=tuple(bootstrap), **kw)
    serve = functools.partial(run_server, identity or Identity.generate(), options)
    if server_class is None:
        return await nursery.start(serve)
    with monkeypatch.context() as patch:  # undoes this patch only, not the test's own
        patch.setattr("peer.node.SpanServer", server_class)
        return await nursery.start(serve)


async def no_sessions_left(*nodes, timeout: float = 20.0) -> None:
    """Wait until every node holds no open session (a deadline, not a sleep)."""
    with trio.fail_after(timeout):
        while any(n.server.open_sessions for n in nodes):
            await trio.sleep(0.02)


def prefer(swarm, node, *, over):
    """Make ``node`` the route's first choice: measured much faster than ``over``."""
    now = trio.current_time()
    for other, seconds in [(node, 1e-4)] + [(o, 0.05) for o in over]:
        swarm.client.health.observe_rtt(other.identity.peer_id, 1e-4, now)
        swarm.client.health.observe_step(other.identity.peer_id, now, seconds=seconds, blocks=1, tokens=1,
                                         success=False)


def route_peers(result):
    return [bytes.fromhex(h.peer_id) for h in result.route]


class Refusing(SpanServer):
    """Answers OPEN_SESSION with an error (the code and retry_after of the class)."""

    code = ErrorCode.INTERNAL
    retry_after: float | None = None
    opens = 0

    async def _open_session(self, conn, msg):
        type(self).opens += 1
        raise RemoteError("refused by the test", code=self.code, retry_after=self.retry_after)


class Busy(Refusing):
    code = ErrorCode.BUSY
    retry_after = 30.0


class Tarpit(SpanServer):
    """Takes sessions and never answers a step (nor a FORWARD_ONCE)."""

    async def _forward(self, conn, msg):
        await trio.sleep_forever()

    async def _forward_once(self, conn, msg):
        await trio.sleep_forever()


class BadSigner(SpanServer):
    async def _forward(self, conn, msg):
        result = await super()._forward(conn, msg)
        return dataclasses.replace(result, signature=bytes(64))


async def test_opening_fails_over_and_the_dead_peer_is_remembered(tiny):
    """Issue 12 item 1: servers 0:3, 3:6 and 0:6; the 0:6 one dies (its records stay): every
    generation completes through 0:3 + 3:6, and only the first one even tries the dead peer."""
    path, model = tiny
    async with trio.open_nursery() as nursery:
        whole = await start(nursery, path, (0, 6))
        halves = [await start(nursery, path, span, bootstrap=[whole.address]) for span in [(0, 3), (3, 6)]]
        swarm = await Swarm.connect(nursery, bootstrap=[halves[0].address], model=path, audit=None)
        swarm.client.view_ttl = 600.0  # plan on the view that still lists the dead peer
        prefer(swarm, whole, over=halves)
        want = reference(model, PROMPT, 12)
        first = await swarm.generate(PROMPT, max_new_tokens=12)
        assert first.token_ids == want
        assert route_peers(first) == [whole.identity.peer_id]
        whole.cancel_scope.cancel()  # dies: listener and connections gone at once
        results = [await swarm.generate(PROMPT, max_new_tokens=12) for _ in range(3)]
        for result in results:
            assert result.token_ids == want
            assert route_peers(result) == [h.identity.peer_id for h in halves]
        assert results[0].failovers == 1  # the open failed over
        assert [r.failovers for r in results[1:]] == [0, 0]  # remembered: not tried again
        assert swarm.client.health.backed_off(whole.identity.peer_id, trio.current_time())
        await no_sessions_left(*halves)
        nursery.cancel_scope.cancel()


async def test_busy_is_honoured_and_a_span_with_no_live_replica_fails_fast(tiny, monkeypatch):
    """A BUSY answer with retry_after backs the peer off for that long (it is not asked
    again meanwhile); blocks whose only server failed are NoRoute naming them, at once."""
    path, model = tiny
    Busy.opens = 0
    async with trio.open_nursery() as nursery:
        busy = await start(nursery, path, (0, 6), server_class=Busy, monkeypatch=monkeypatch)
        halves = [await start(nursery, path, span, bootstrap=[busy.address]) for span in [(0, 3), (3, 6)]]
        swarm = await Swarm.connect(nursery, bootstrap=[busy.address], model=path, audit=None)
        # Routing goes by what the client measured: have it measure the busy server fast
        # and the halves slow, so that its first route is the busy one (on a loaded
        # machine the probes alone may rank them either way).
        now = trio.current_time()
        for node, seconds in [(busy, 0.0)] + [(h, 1.0) for h in halves]:
            swarm.client.health.observe_rtt(node.identity.peer_id, 0.001, now)
            swarm.client.health.observe_step(node.identity.peer_id, now, seconds=seconds, blocks=3, tokens=1,
                                             success=False)
        for _ in range(3):
            result = await swarm.generate(PROMPT, max_new_tokens=6)
            assert result.token_ids == reference(model, PROMPT, 6)
        assert Busy.opens == 1
        # backed off for exactly the retry_after it asked for, from the refusal on (not
        # measured against the clock now: three generations take long on a loaded machine)
        record = swarm.client.health.record(busy.identity.peer_id)
        assert record.backoff_until - record.last_failure == pytest.approx(Busy.retry_after)
        assert swarm.client.health.backoff_left(busy.identity.peer_id, trio.current_time()) > 0
        # 3:6's only server goes away: fail fast, naming the blocks
        halves[1].cancel_scope.cancel()
        with pytest.raises((AllCandidatesFailed, NoRoute), match="blocks 3..5"):
            await swarm.generate(PROMPT, max_new_tokens=6)
        t0 = trio.current_time()
        with pytest.raises(NoRoute, match="blocks 3..5") as info:
            await swarm.generate(PROMPT, max_new_tokens=6)
        assert info.value.retry_in is not None
        assert trio.current_time() - t0 < 5
        await no_sessions_left(halves[0])
        nursery.cancel_scope.cancel()


async def test_every_failure_path_closes_what_it_opened(tiny, monkeypatch):
    """Issue 12 item 2: a later hop failing at open, a replacement failing during replay,
    and cancellation mid-generation leave no session open anywhere."""
    path, model = tiny
    async with trio.open_nursery() as nursery:
        head = await start(nursery, path, (0, 3), max_sessions=4)
        refusing = await start(nursery, path, (3, 6), bootstrap=[head.address], server_class=Refusing,
                               monkeypatch=monkeypatch)
        swarm = await Swarm.connect(nursery, bootstrap=[head.address], model=path, audit=None)
        # 1. the tail refuses every open: more failed opens than the head has slots
        for _ in range(6):
            swarm.client.health.peers.clear()  # forget, so that every try really opens the head
            with pytest.raises(AllCandidatesFailed, match="blocks 3..5"):
                await swarm.generate(PROMPT, max_new_tokens=4)
            await no_sessions_left(head)
        refusing.cancel_scope.cancel()
        # 2. a replacement that fails during replay is closed too
        good = await start(nursery, path, (3, 6), bootstrap=[head.address])
        liar = await start(nursery, path, (3, 6), bootstrap=[head.address], server_class=BadSigner,
                           monkeypatch=monkeypatch)
        swarm.client.health.peers.clear()
        await swarm.client.swarm_view(fresh=True)
        killed = []

        def kill_the_good_tail(event):
            if event.index == 3 and not killed:
                killed.append(good)
                good.cancel_scope.cancel()

        with pytest.raises(AllCandidatesFailed, match="blocks 3..5"):
            await swarm.generate(PROMPT, max_new_tokens=10, on_token=kill_the_good_tail)
        assert killed
        await no_sessions_left(head, liar)
        # 3. cancelled mid-generation
        tail = await start(nursery, path, (3, 6), bootstrap=[head.address])
        swarm.client.health.peers.clear()
        await swarm.client.swarm_view(fresh=True)
        with trio.CancelScope() as scope:
            async for event in swarm.stream(PROMPT, max_new_tokens=40):
                if event.index == 5:
                    assert head.server.open_sessions == 1
                    assert tail.server.open_sessions == 1
                    scope.cancel()
        await no_sessions_left(head, tail, liar)
        nursery.cancel_scope.cancel()


async def generate_hanging(swarm, server_class):
    """16 tokens with a 60 s step timeout; ``server_class.hang`` is set at the fifth.
    Far below 60 s: the hedge, not the timeout, ends the wait."""

    def hang(event):
        if event.index == 4:
            server_class.hang = True

    with trio.fail_after(30):
        return await swarm.generate(PROMPT, max_new_tokens=16, on_token=hang)


async def test_a_hung_hop_is_hedged(tiny, monkeypatch):
    """Issue 12 item 5 in one process: the hop in use stops answering mid-generation; a
    hedge on the other replica takes over after about twice the expected step time,
    long before the step timeout, and the tokens are the same."""
    path, model = tiny

    class Hangs(SpanServer):
        hang = False

        async def _forward(self, conn, msg):
            if type(self).hang:
                await trio.sleep_forever()
            return await super()._forward(conn, msg)

    async with trio.open_nursery() as nursery:
        a = await start(nursery, path, (0, 6), server_class=Hangs, monkeypatch=monkeypatch)
        b = await start(nursery, path, (0, 6), bootstrap=[a.address])
        swarm = await Swarm.connect(nursery, bootstrap=[b.address], model=path, audit=None, step_timeout=60.0)
        a_id = a.identity.peer_id
        prefer(swarm, a, over=[b])

        result = await generate_hanging(swarm, Hangs)
        assert result.token_ids == reference(model, PROMPT, 16)
        assert result.hedges >= 1
        assert route_peers(result) == [b.identity.peer_id]
        assert swarm.client.health.backed_off(a_id, trio.current_time())
        Hangs.hang = False
        nursery.cancel_scope.cancel()


async def test_a_hung_hop_is_hedged_by_several_hops(tiny, monkeypatch):
    """Issue 12 item 5 when no other server covers the hung hop's blocks alone: the 0:6
    hop in use stops answering mid-generation; a route 0:3 + 3:6 around it is opened
    from the cached view and the hop's history replayed there, as a failover does, and
    it takes over long before the step timeout, with the same tokens. The session on
    the hung server is freed once it wakes."""
    path, model = tiny

    class Hangs(SpanServer):
        hang = False
        wake = trio.Event()

        async def _forward(self, conn, msg):
            if type(self).hang:
                await type(self).wake.wait()
            return await super()._forward(conn, msg)

    async with trio.open_nursery() as nursery:
        whole = await start(nursery, path, (0, 6), server_class=Hangs, monkeypatch=monkeypatch)
        halves = [await start(nursery, path, span, bootstrap=[whole.address]) for span in [(0, 3), (3, 6)]]
        swarm = await Swarm.connect(nursery, bootstrap=[halves[0].address], model=path, audit=None,
                                    step_timeout=60.0)
        swarm.client.view_ttl = 600.0  # the hedge is planned on the cached view, without a lookup
        prefer(swarm, whole, over=halves)

        result = await generate_hanging(swarm, Hangs)
        assert result.token_ids == reference(model, PROMPT, 16)
        assert result.hedges >= 1
        assert result.failovers == 0
        assert route_peers(result) == [h.identity.peer_id for h in halves]
        assert swarm.client.health.backed_off(whole.identity.peer_id, trio.current_time())
        assert not any(h.server.open_sessions for h in halves)  # the generation closed its sessions
        Hangs.wake.set()
        await no_sessions_left(whole, *halves)
        nursery.cancel_scope.cancel()


async def test_a_slow_lone_holder_is_waited_for_not_failed(tiny, monkeypatch):
    """A derived step deadline is a guess: the only server of the blocks answers one step
    five times later than its deadline (a loaded machine). With nowhere to fail over
    to, the client waits on, up to its step timeout, and gets the same tokens, without
    a failover and without backing the server off. A hedge that never starts never
    decodes the hop's history (once per step, that made a generation quadratic)."""
    path, model = tiny
    decoded = []
    kept_prefix = chain_module.kept_prefix
    monkeypatch.setattr(chain_module, "kept_prefix", lambda *a, **k: decoded.append(a) or kept_prefix(*a, **k))

    class SlowOnce(SpanServer):
        slow = False

        async def _forward(self, conn, msg):
            if type(self).slow:
                type(self).slow = False
                await trio.sleep(1.0)
            return await super()._forward(conn, msg)

    def slow_down(event):
        if event.index == 4:
            SlowOnce.slow = True

    async with trio.open_nursery() as nursery:
        lone = await start(nursery, path, (0, 6), server_class=SlowOnce, monkeypatch=monkeypatch)
        swarm = await Swarm.connect(nursery, bootstrap=[lone.address], model=path, audit=None, step_timeout=30.0)
        swarm.client.health.timeouts = TimeoutPolicy(slack=2.0, floor=0.2, cap=30.0)
        assert swarm.client.health.step_timeout(lone.identity.peer_id, blocks=6, tokens=1) <= 10.0  # unmeasured
        with trio.fail_after(20):
            result = await swarm.generate(PROMPT, max_new_tokens=12, on_token=slow_down)
        assert not SlowOnce.slow  # the slow step happened
        assert swarm.client.health.step_timeout(lone.identity.peer_id, blocks=6, tokens=1) < 0.5  # measured
        assert result.token_ids == reference(model, PROMPT, 12)
        assert result.failovers == 0
        assert result.hedges == 0
        assert decoded == []
        assert not swarm.client.health.backed_off(lone.identity.peer_id, trio.current_time())
        nursery.cancel_scope.cancel()


async def test_lying_announcements_cost_a_probe_not_the_generation(tiny, monkeypatch):
    """Issue 10 item 7: eight identities (= max_failovers) announce 0:6 with throughput 1e300
    and 2**32 free sessions, take sessions and never answer; one more stores a record under
    block 0 only, claiming 0:6. An honest client still completes with correct tokens and no
    failover: probes find the liars before any session is opened on them, and the record
    under block 0 makes nobody route blocks 1..5 there."""
    path, model = tiny

    def liar_announcement(self, expires, throughput):
        ann = SpanServer.make_announcement(self, expires, throughput)
        return dataclasses.replace(ann, throughput=1e300, free_sessions=2**32)

    class Liar(Tarpit):
        make_announcement = liar_announcement

    async with trio.open_nursery() as nursery:
        honest = [await start(nursery, path, (0, 3))]
        honest.append(await start(nursery, path, (3, 6), bootstrap=[honest[0].address]))
        boot = [honest[0].address]
        liars = [await start(nursery, path, (0, 6), bootstrap=boot, server_class=Liar, monkeypatch=monkeypatch)
                 for _ in range(8)]
        import swarm.announce as announce

        # Only the claimer's records shrink: the honest servers renew theirs (and withdraw
        # the keys they no longer publish) through the same function during the test.
        claimer_id = Identity.generate()
        all_records = announce.announcement_records

        def claimer_records(identity, *a, **k):
            records = all_records(identity, *a, **k)
            return records[:1] if identity.peer_id == claimer_id.peer_id else records

        monkeypatch.setattr(announce, "announcement_records", claimer_records)
        claimer = await start(nursery, path, (0, 6), bootstrap=boot, server_class=Liar, monkeypatch=monkeypatch,
                              identity=claimer_id)
        swarm = await Swarm.connect(nursery, bootstrap=boot, model=path, audit=None)
        view = await swarm.status()
        assert len(view.servers) == 11
        assert view.routable(view.servers[claimer.identity.peer_id]) == [(0, 1)]
        want = reference(model, PROMPT, 12)
        for _ in range(2):
            result = await swarm.generate(PROMPT, max_new_tokens=12)
            assert result.token_ids == want
            assert result.failovers == 0
            assert route_peers(result) == [h.identity.peer_id for h in honest]
        now = trio.current_time()
        assert all(swarm.client.health.backed_off(liar.identity.peer_id, now) for liar in liars)
        assert swarm.client.max_failovers == len(liars)
        nursery.cancel_scope.cancel()


async def test_a_session_opened_after_the_client_gave_up_is_not_left_behind(tiny, monkeypatch):
    """Found by bench/churn.py's SIGSTOP scenario: a hung server opens the session when it
    wakes, after the client's open deadline; the client dropped that connection when the
    open timed out, so the server frees the session instead of holding it for the
    connection's life. The generation itself fails over to the other replica."""
    path, model = tiny
    wake = trio.Event()

    class WakesLate(SpanServer):
        async def _open_session(self, conn, msg):
            await wake.wait()
            return await super()._open_session(conn, msg)

    async with trio.open_nursery() as nursery:
        late = await start(nursery, path, (0, 6), server_class=WakesLate, monkeypatch=monkeypatch)
        other = await start(nursery, path, (0, 6), bootstrap=[late.address])
        swarm = await Swarm.connect(nursery, bootstrap=[other.address], model=path, audit=None)
        prefer(swarm, late, over=[other])
        result = await swarm.generate(PROMPT, max_new_tokens=4)
        assert result.token_ids == reference(model, PROMPT, 4)
        assert route_peers(result) == [other.identity.peer_id]
        with trio.fail_after(20):  # the let-go open times out in the background, then backs it off
            while not swarm.client.health.backed_off(late.identity.peer_id, trio.current_time()):
                await trio.sleep(0.02)
        wake.set()  # it opens the session now, on a connection the client already closed
        await no_sessions_left(late, other)
        nursery.cancel_scope.cancel()
