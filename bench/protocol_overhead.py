"""Per-hop protocol cost of one relay step, stage by stage, against a plain bytes copy.

One hop of the relay, both directions, exactly as peer/_chain.py (client) and
peer/server.py (server) do it, minus sockets, trio and the model:

* request, client: ``encode_tensor`` (model dtype -> wire dtype), ``WireTensor.digest``,
  the forward-request statement and its Ed25519 signature, ``Forward`` (validated
  construction), ``encode_message``, ``Connection.send`` (Noise encrypt + framing);
* request, server: ``receive_data`` + ``next_event`` (decrypt), ``decode_message``, the
  input digest again and ``verify`` of the client's signature, ``decode_tensor`` (wire
  dtype -> model dtype);
* result, server: ``encode_tensor`` of the output, its digest and the signed
  forward-result statement, ``ForwardResult`` + ``encode_message``, ``send``;
* result, client: ``receive_data`` + ``next_event``, ``decode_message``, the output
  digest and ``verify`` of the server's signature, ``decode_tensor``.

Two payloads by default: a decode step ([1, 1, 8192]) and a 512-token prefill
([1, 512, 8192]), f16 on the wire, float32 in the model (the relay's conversions
included). Each stage is timed (``time.perf_counter``; ``--clock cpu``: process CPU time) on every iteration and the
median is printed; the round trip is also timed uninstrumented. The baseline, measured
in the same run, is one copy of the tensor's wire bytes (``memoryview(data).tobytes()``):
the least any hop must do with them. DESIGN.md's target for the decode step: about
150 us per hop.

Run: ``.venv/bin/python bench/protocol_overhead.py [--hidden 8192] [--prefill 512]
[--wire-dtype f16] [--iterations N] [--clock wall|cpu] [--profile]``.
On a shared machine compare the ratios and the CPU-clock figures, not wall-clock absolutes.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable

import torch

from protocol import (
    EMPTY_HISTORY,
    Connection,
    Forward,
    ForwardResult,
    Identity,
    MessageReceived,
    Role,
    decode_message,
    decode_tensor,
    encode_message,
    encode_tensor,
    extend_history,
    forward_request_statement,
    forward_result_statement,
    verify_signature,
)

MODEL = "bench/protocol-overhead"
SPAN = (0, 10)
clock = time.perf_counter  # --clock cpu: time.process_time, steadier on a loaded machine
TARGET_US = 150.0  # DESIGN.md, "Performance targets": per hop, one decode step of hidden size 8192

STAGES = (
    ("client", "encode_tensor"),
    ("client", "digest (input)"),
    ("client", "sign request statement"),
    ("client", "Forward(...) construct"),
    ("client", "encode_message"),
    ("client", "send (encrypt + frame)"),
    ("server", "receive_data + next_event"),
    ("server", "decode_message"),
    ("server", "digest (input)"),
    ("server", "verify request signature"),
    ("server", "decode_tensor"),
    ("server", "encode_tensor (output)"),
    ("server", "digest (output)"),
    ("server", "sign result statement"),
    ("server", "ForwardResult + encode_message"),
    ("server", "send (encrypt + frame)"),
    ("client", "receive_data + next_event"),
    ("client", "decode_message"),
    ("client", "digest (output)"),
    ("client", "verify result signature"),
    ("client", "decode_tensor"),
)
REQUEST_STAGES = 11  # the first 11 carry the request; the rest the result


def connected_pair(client_id: Identity, server_id: Identity) -> tuple[Connection, Connection]:
    """A client (initiator) and a server (responder) Connection after the handshake."""
    client = Connection(client_id, Role.INITIATOR, expected_peer_id=server_id.peer_id)
    server = Connection(server_id, Role.RESPONDER)
    server.receive_data(client.initiate())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    for conn in (client, server):
        event = conn.next_event()
        assert type(event).__name__ == "HandshakeComplete", event
    return client, server


class Hop:
    """Both ends of one hop and the per-session values the relay signs."""

    def __init__(self, wire_dtype: str) -> None:
        self.wire_dtype = wire_dtype
        self.client_id, self.server_id = Identity.generate(), Identity.generate()
        self.client, self.server = connected_pair(self.client_id, self.server_id)
        self.session = os.urandom(16)
        self.step = 0
        self.client_history = self.server_history = EMPTY_HISTORY  # running digests of the inputs

    def round_trip(self, x: torch.Tensor, output: torch.Tensor, marks: list[float] | None = None) -> torch.Tensor:
        """One request and its result; appends a clock reading before and after each stage to ``marks``."""
        if marks is None:
            mark = _no_mark
        else:
            def mark(now: Callable[[], float] = clock, append: Callable[[float], None] = marks.append) -> None:
                append(now())
        me, srv = self.client_id, self.server_id
        session, step, position = self.session, self.step, self.step
        self.step += 1
        mark()
        # client: the request
        wire = encode_tensor(x, self.wire_dtype)
        mark()
        input_digest = wire.digest()
        mark()
        request_signature = me.sign(forward_request_statement(
            client=me.peer_id, server=srv.peer_id, session=session, step=step, model=MODEL, span=SPAN,
            position=position, input_digest=input_digest))
        mark()
        request = Forward(session=session, step=step, position=position, hidden=wire,
                          signature=request_signature)
        mark()
        payload = encode_message(request, 1)
        mark()
        data = self.client.send(payload)
        mark()
        # server: receive, check, decode
        self.server.receive_data(data)
        event = self.server.next_event()
        mark()
        assert isinstance(event, MessageReceived)
        _, msg = decode_message(event.payload)
        mark()
        assert isinstance(msg, Forward)
        server_input_digest = msg.hidden.digest()
        mark()
        verify_signature(me.public_key, forward_request_statement(
            client=me.peer_id, server=srv.peer_id, session=msg.session, step=msg.step, model=MODEL, span=SPAN,
            position=msg.position, input_digest=server_input_digest), msg.signature)
        mark()
        hidden = decode_tensor(msg.hidden, out_dtype=output.dtype)
        mark()
        assert hidden.shape == output.shape
        # server: the result (``output`` stands in for the blocks' output)
        out = encode_tensor(output, self.wire_dtype)
        mark()
        output_digest = out.digest()
        mark()
        self.server_history = extend_history(self.server_history, server_input_digest)
        result_signature = srv.sign(forward_result_statement(
            server=srv.peer_id, session=msg.session, step=msg.step, model=MODEL, span=SPAN,
            input_digest=server_input_digest, output_digest=output_digest, history=self.server_history))
        mark()
        payload = encode_message(ForwardResult(session=msg.session, step=msg.step, hidden=out,
                                               signature=result_signature), 1)
        mark()
        data = self.server.send(payload)
        mark()
        # client: receive, check, decode
        self.client.receive_data(data)
        event = self.client.next_event()
        mark()
        assert isinstance(event, MessageReceived)
        _, result = decode_message(event.payload)
        mark()
        assert isinstance(result, ForwardResult)
        result_digest = result.hidden.digest()
        mark()
        self.client_history = extend_history(self.client_history, input_digest)
        verify_signature(srv.public_key, forward_result_statement(
            server=srv.peer_id, session=session, step=step, model=MODEL, span=SPAN, input_digest=input_digest,
            output_digest=result_digest, history=self.client_history), result.signature)
        mark()
        y = decode_tensor(result.hidden, out_dtype=x.dtype)
        mark()
        return y


def _no_mark() -> None:
    pass


def copy_baseline(data: bytes, iterations: int) -> float:
    """Median seconds for one copy of ``data`` (in batches, to beat the clock's resolution)."""
    batch = max(1, 2_000_000 // max(len(data), 1))
    runs = []
    for _ in range(max(5, iterations // batch)):
        t0 = clock()
        for _ in range(batch):
            memoryview(data).tobytes()
        runs.append((clock() - t0) / batch)
    return statistics.median(runs)


def _median_time(fn: Callable[[], object], iterations: int) -> float:
    for _ in range(max(3, iterations // 10)):
        fn()
    runs = []
    for _ in range(iterations):
        t0 = clock()
        fn()
        runs.append(clock() - t0)
    return statistics.median(runs)


def primitive_floor(x: torch.Tensor, wire_dtype: str, iterations: int) -> dict[str, tuple[int, float]]:
    """The library primitives one round trip cannot avoid, each timed alone: name -> (count, seconds).

    Ed25519 sign and verify of a statement-sized message, BLAKE2b-256 of the wire
    bytes (each tensor is hashed by its sender and its receiver), ChaCha20-Poly1305 of
    the wire bytes one way and back, and the dtype conversions to and from the wire.
    """
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_decrypt as aead_decrypt
    from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt as aead_encrypt

    identity = Identity.generate()
    statement = bytes(200)
    signature = identity.sign(statement)
    wire = encode_tensor(x, wire_dtype)
    data, key, nonce = wire.data, bytes(32), bytes(12)
    sealed = aead_encrypt(data, b"", nonce, key)
    narrow = decode_tensor(wire)
    return {
        "Ed25519 sign (200 B)": (2, _median_time(lambda: identity.sign(statement), iterations)),
        "Ed25519 verify (200 B)": (2, _median_time(lambda: verify_signature(identity.public_key, statement, signature),
                                                   iterations)),
        "BLAKE2b-256 of the wire bytes": (4, _median_time(
            lambda: hashlib.blake2b(data, digest_size=32).digest(), iterations)),
        "ChaCha20-Poly1305 encrypt": (2, _median_time(lambda: aead_encrypt(data, b"", nonce, key), iterations)),
        "ChaCha20-Poly1305 decrypt": (2, _median_time(lambda: aead_decrypt(sealed, b"", nonce, key), iterations)),
        f"{str(x.dtype).removeprefix('torch.')} -> {wire_dtype} bytes": (2, _median_time(
            lambda: x.to(narrow.dtype).numpy().tobytes(), iterations)),
        f"{wire_dtype} bytes -> {str(x.dtype).removeprefix('torch.')}": (2, _median_time(
            lambda: torch.frombuffer(bytearray(data), dtype=narrow.dtype).to(x.dtype), iterations)),
    }


def measure(name: str, shape: tuple[int, ...], *, model_dtype: torch.dtype, wire_dtype: str,
            iterations: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=model_dtype)
    output = torch.randn(shape, dtype=model_dtype)
    hop = Hop(wire_dtype)
    warmup = max(3, iterations // 10)
    for _ in range(warmup):
        hop.round_trip(x, output)
    per_stage: list[list[float]] = [[] for _ in STAGES]
    totals = []
    for _ in range(iterations):
        marks: list[float] = []
        hop.round_trip(x, output, marks)
        for i in range(len(STAGES)):
            per_stage[i].append(marks[i + 1] - marks[i])
        totals.append(marks[-1] - marks[0])
    plain = []
    for _ in range(iterations):
        t0 = clock()
        hop.round_trip(x, output)
        plain.append(clock() - t0)
    wire_bytes = len(encode_tensor(x, wire_dtype).data)
    return dict(name=name, shape=shape, wire_bytes=wire_bytes, stages=[statistics.median(s) for s in per_stage],
                total=statistics.median(totals), plain=statistics.median(plain), plain_best=min(plain),
                copy=copy_baseline(encode_tensor(x, wire_dtype).data, iterations), iterations=iterations,
                floor=primitive_floor(x, wire_dtype, iterations))


def report(r: dict, wire_dtype: str, model_dtype: torch.dtype) -> None:
    us = 1e6
    model = str(model_dtype).removeprefix("torch.")
    print(f"\n{r['name']}: shape {list(r['shape'])}, model {model}, wire {wire_dtype} "
          f"({r['wire_bytes'] / 1024:.0f} KiB each way), median of {r['iterations']} round trips")
    for i, ((side, stage), t) in enumerate(zip(STAGES, r["stages"])):
        if i == 0:
            print("  request  (client -> server)")
        if i == REQUEST_STAGES:
            print("  result   (server -> client)")
        print(f"    {side:6s} {stage:32s} {t * us:10.1f} us")
    req, res = sum(r["stages"][:REQUEST_STAGES]), sum(r["stages"][REQUEST_STAGES:])
    print(f"  sum of stage medians: request {req * us:.1f} us + result {res * us:.1f} us = {(req + res) * us:.1f} us")
    total = r["plain"]
    mbps = 2 * r["wire_bytes"] / total / 1e6
    print(f"  round trip, uninstrumented: {total * us:.1f} us median, {r['plain_best'] * us:.1f} us best "
          f"(instrumented {r['total'] * us:.1f} us); {mbps:.0f} MB/s of tensor bytes (both ways)")
    copy = r["copy"]
    print(f"  baseline, one copy of the wire bytes: {copy * us:.2f} us ({r['wire_bytes'] / copy / 1e6:.0f} MB/s); "
          f"round trip / 2 copies: {total / (2 * copy):.0f}x")
    floor = sum(count * t for count, t in r["floor"].values())
    print("  floor, the primitives a round trip needs, each timed alone (median of one; times per round trip):")
    for name, (count, t) in r["floor"].items():
        print(f"    {name:34s} {t * us:10.1f} us x {count} = {count * t * us:10.1f} us")
    print(f"  floor total {floor * us:.1f} us; round trip / floor: {total / floor:.2f}x "
          f"(the rest, {(total - floor) * us:.1f} us, is Python, CBOR, validation and copies)")


def profile(hop_fn: Callable[[], object], iterations: int, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iterations):
        hop_fn()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    for order, title, restrict in (("tottime", "own time", ()), ("cumulative", "cumulative time, protocol/ only",
                                                                   ("protocol/",))):
        out.seek(0)
        out.truncate()
        stats.sort_stats(order).print_stats(*restrict, top)
        print(f"\ncProfile of {iterations} decode-step round trips, top {top} by {title} (seconds):")
        lines = out.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print("\n".join(lines[start:]).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--prefill", type=int, default=512, help="tokens in the prefill step (0: skip it)")
    parser.add_argument("--wire-dtype", default="f16", choices=("f32", "f16", "bf16", "q8", "nf4"))
    parser.add_argument("--model-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="dtype of the hidden states on both ends (the relay's is float32 on CPU)")
    parser.add_argument("--iterations", type=int, default=3000, help="decode-step round trips (prefill: /100)")
    parser.add_argument("--repeats", type=int, default=3, help="whole measurements; the median one is reported")
    parser.add_argument("--profile", action="store_true", help="also cProfile the decode-step round trip")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, which other load on the machine disturbs less")
    args = parser.parse_args()
    global clock
    if args.clock == "cpu":
        clock = time.process_time
    model_dtype = getattr(torch, args.model_dtype)
    print(f"protocol overhead per hop ({args.clock} clock); torch threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cases = [("decode step", (1, 1, args.hidden), args.iterations)]
    if args.prefill:
        cases.append((f"{args.prefill}-token prefill", (1, args.prefill, args.hidden), max(5, args.iterations // 100)))
    for name, shape, iterations in cases:
        runs = [measure(name, shape, model_dtype=model_dtype, wire_dtype=args.wire_dtype, iterations=iterations)
                for _ in range(args.repeats)]
        runs.sort(key=lambda r: r["plain"])
        report(runs[len(runs) // 2], args.wire_dtype, model_dtype)
        if len(runs) > 1:
            each = ", ".join(f"{r['plain'] * 1e6:.1f}" for r in runs)
            print(f"  round trip of each run: {each} us")
        if name == "decode step":
            r = runs[len(runs) // 2]
            trip, one_way = r["plain"] * 1e6, sum(r["stages"][:REQUEST_STAGES]) * 1e6
            print(f"  target (DESIGN.md): <= ~{TARGET_US:.0f} us per hop. Round trip (request + result) "
                  f"{trip:.1f} us = {trip / TARGET_US:.2f}x the target; one way (the request alone: encode, "
                  f"sign, encrypt, decrypt, verify, decode) {one_way:.1f} us = {one_way / TARGET_US:.2f}x")
    if args.profile:
        torch.manual_seed(0)
        x = torch.randn(1, 1, args.hidden, dtype=model_dtype)
        out = torch.randn(1, 1, args.hidden, dtype=model_dtype)
        hop = Hop(args.wire_dtype)
        for _ in range(100):
            hop.round_trip(x, out)
        profile(lambda: hop.round_trip(x, out), args.iterations, args.top)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
