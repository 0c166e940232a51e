"""``python -m bench.wanem``: the delay proxy as a process, and topology tools.

    python -m bench.wanem proxy --topology FILE --route NODE=PORT [--route ...] [--no-overhead]
    python -m bench.wanem table --topology FILE
    python -m bench.wanem overhead

``proxy`` listens for each routed node on a free port at the node's address and
forwards to the node's address at PORT. It prints its overhead at zero delay
(``wanem-proxy: overhead ...``), then one line ``wanem-proxy: ready {JSON node ->
address}``, forwards until SIGTERM or Ctrl-C, and prints each link's traffic on exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys

import trio

from ._proxy import DelayProxy, Route, measure_overhead
from ._topology import Topology


def overhead_line(direct: float, proxied: float) -> str:
    return (f"wanem-proxy: overhead at zero delay: +{(proxied - direct) * 1e6:.0f} us per round trip "
            f"(64-byte ping-pong, median: direct {direct * 1e6:.0f} us, through the proxy {proxied * 1e6:.0f} us)")


async def _proxy(topology: Topology, routes: list[Route], overhead: bool) -> DelayProxy:
    if overhead:
        print(overhead_line(*await measure_overhead()), flush=True)
    proxy = DelayProxy(topology, routes)
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(proxy.run)
        print(f"wanem-proxy: ready {json.dumps(addresses)}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()
    return proxy


def _report(proxy: DelayProxy) -> str:
    s = proxy.stats
    lines = [f"wanem-proxy: {s.connections} connections forwarded, {s.refused} refused (unknown source), "
             f"{s.failed_upstream} failed upstream"]
    for (src, dst), queue in sorted(s.links.items()):
        bw = "unlimited" if math.isinf(queue.link.bandwidth) else f"{queue.link.mbit:g} Mbit/s"
        lines.append(f"  {src} -> {dst}: {queue.bytes} bytes in {queue.segments} segments "
                     f"(one-way {queue.link.delay * 1e3:g} ms, {bw})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wanem", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy", help="run the delay proxy")
    p.add_argument("--topology", required=True)
    p.add_argument("--route", action="append", default=[], metavar="NODE=PORT",
                   help="forward connections to NODE (at the proxy's port for it) to NODE's ip:PORT")
    p.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip the zero-delay self-test")
    t = sub.add_parser("table", help="print the RTT / bandwidth matrix of a topology")
    t.add_argument("--topology", required=True)
    sub.add_parser("overhead", help="measure the proxy's overhead at zero delay")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if args.cmd == "overhead":
        print(overhead_line(*trio.run(measure_overhead)))
        return 0
    topology = Topology.load(args.topology)
    if args.cmd == "table":
        print(topology.table())
        return 0
    routes = []
    for item in args.route:
        node, _, port = item.partition("=")
        routes.append(Route(node=node, target=(topology.node(node).ip, int(port))))
    proxy = trio.run(_proxy, topology, routes, args.overhead)
    print(_report(proxy), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
