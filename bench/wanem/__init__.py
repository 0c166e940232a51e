"""wanem: a userspace WAN emulator for swarm-peer benchmarks (issue 14, section 1).

There is no netem on these machines, so delay is added in userspace: every emulated
node gets its own loopback address (127.0.0.x) that it listens on and dials from, and
a delay proxy listens on each server's announced address and forwards to the real one,
applying the one-way delay and bandwidth of the (source, destination) pair in both
directions, order preserved. All traffic stays on loopback.

Pieces (each importable alone):

- ``Topology`` (``_topology.py``): nodes (name, region, ip) and link figures, from the
  built-in region table ``REGION_RTT_MS`` (intra-region 3 ms, tokyo-seoul 30 ms,
  tokyo-virginia 150 ms, virginia-frankfurt 90 ms, tokyo-frankfurt 230 ms RTT; 100
  Mbit/s unless set) or overrides; a TOML file format (``Topology.load``/``dumps``).
- ``DelayProxy`` and ``LinkQueue`` (``_proxy.py``): the trio proxy and its pure core;
  ``measure_overhead()`` gives its cost at zero delay.
- ``EmulatedSwarm`` (``_swarm.py``): starts the proxy (``python -m bench.wanem proxy``,
  its own process) and one ``swarm-peer serve`` per ``ServerSpec`` on its node, and
  puts clients on nodes (``connect``). ``proxy=False``: same processes, no delay.

A configuration in a few lines (issue 14 section 4 (a), a far data center)::

    import sys; sys.path.insert(0, REPO_ROOT)   # scripts under bench/ run with bench/ on sys.path
    from bench.wanem import EmulatedSwarm, ServerSpec, Topology, exit_on_sigterm

    exit_on_sigterm()
    topo = Topology.make([("client", "tokyo"), ("dc", "virginia")], bandwidth_mbit=100)
    with EmulatedSwarm(topo, "smollm2-135m-instruct", [ServerSpec(node="dc", blocks=(0, 30))],
                       workdir=tmp) as emu:
        async def run():
            async with trio.open_nursery() as nursery:
                swarm = await emu.connect(nursery, "client", audit=None)
                result = await swarm.generate("Hello", max_new_tokens=32, chat=False)
                await swarm.aclose()
        trio.run(run)

Replicas in three regions (b)-(d): ``regional({"client": "tokyo"}, {"tokyo": 3,
"seoul": 3, "virginia": 3})`` makes nodes ``tokyo-0`` .. ``virginia-2``; one
``ServerSpec`` per node (e.g. ``tokyo-0`` 0:10, ``tokyo-1`` 10:20, ...). A chain
that must cross regions (e): ``ServerSpec(node="tokyo-0", blocks=(0, 10))``,
``ServerSpec(node="seoul-0", blocks=(10, 20))``, ``ServerSpec(node="virginia-0",
blocks=(20, 30))``. Server-to-server traffic goes through the proxy too (servers
dial the announced addresses from their own ip). ``python -m bench.wanem table
--topology FILE`` prints a topology's matrix.

What is not emulated: loss, jitter and reordering (the figures are floors: scheduling
on a loaded machine only adds delay); TCP's window and congestion control (a link is
a FIFO bottleneck at its bandwidth, with ~4 MiB buffered per connection direction
before TCP backpressure); a client's inbound listener is not behind the proxy (only
servers are dialled in the relay). Addresses 127.0.0.253 and .254 are the overhead
probe's; auto-assigned node addresses start at 127.0.0.10.
"""

from ._proxy import SEGMENT, DelayProxy, LinkQueue, Route, measure_overhead
from ._swarm import REPO_ROOT, EmulatedSwarm, EmulatorError, ProxyProcess, ServerSpec, die_with_parent, exit_on_sigterm
from ._topology import REGION_RTT_MS, REGIONS, Link, Node, Topology, TopologyError, region_rtt_ms, regional

__all__ = [
    "DelayProxy", "EmulatedSwarm", "EmulatorError", "Link", "LinkQueue", "Node", "ProxyProcess", "REGIONS",
    "REGION_RTT_MS", "REPO_ROOT", "Route", "SEGMENT", "ServerSpec", "Topology", "TopologyError",
    "die_with_parent", "exit_on_sigterm", "measure_overhead", "region_rtt_ms", "regional",
]
