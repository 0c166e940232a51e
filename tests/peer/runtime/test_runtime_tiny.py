"""Span executors on tiny random Llama, Mistral and Qwen2 models vs transformers.

The reference is ``AutoModelForCausalLM.from_pretrained`` on the same directory and its
``generate``; our side is a chain of spans of uneven sizes plus the client head.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import peer.runtime as rt

SPANS = {
    "llama": [(0, 1), (1, 5), (5, 7)],
    "mistral": [(0, 3), (3, 5)],
    "qwen2": [(0, 2), (2, 3), (3, 6)],  # the last span crosses from full to sliding layers
}
NEW_TOKENS = 64


def _reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompt(seed: int, n: int = 11) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (n,), generator=g).tolist()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_chain_matches_transformers_generate(kind: str, tiny_models: dict[str, Path]) -> None:
    path = tiny_models[kind]
    head = rt.load_head(str(path))
    spans = [rt.load_span(str(path), a, b) for a, b in SPANS[kind]]
    ref = _reference(path)
    worst = 0.0
    for seed in range(1):
        prompt = _prompt(seed)
        ours_logits: list[torch.Tensor] = []
        ours = rt.generate_local(head, spans, prompt, rt.SamplingParams(max_new_tokens=NEW_TOKENS),
                                 logits_out=ours_logits)
        out = ref.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
        theirs = out.sequences[0, len(prompt):].tolist()
        assert ours == theirs
        assert len(ours) == NEW_TOKENS
        for a, b in zip(ours_logits, out.logits, strict=True):
            worst = max(worst, (a - b[0]).abs().max().item())
    print(f"{kind}: max |logit difference| over {NEW_TOKENS} tokens = {worst:.3g}")
    assert worst < 1e-4
    for ex in spans:
        assert ex.sessions.count == 0  # generate_local closed its sessions


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_forward_once_equals_incremental_session(kind: str, tiny_models: dict[str, Path]) -> None:
    path = tiny_models[kind]
    ex = rt.load_span(str(path), *SPANS[kind][-1])
    x = torch.randn(1, 20, ex.hidden_size, generator=torch.Generator().manual_seed(1))
    whole = ex.forward_once(x)
    sid = ex.open_session(20)
    parts = [ex.forward(sid, x[:, :7], 0)]
    for i in range(7, 20):
        parts.append(ex.forward(sid, x[:, i : i + 1], i))
    assert ex.session_length(sid) == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_concurrent_sessions_are_independent(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["mistral"]), 0, 5)
    g = torch.Generator().manual_seed(2)
    xa, xb = torch.randn(1, 12, 64, generator=g), torch.randn(1, 12, 64, generator=g)
    a, b = ex.open_session(12), ex.open_session(12)
    assert a != b
    assert len(a) == 16
    outs_a, outs_b = [], []
    for i in range(12):  # interleave decode steps of the two sessions
        outs_a.append(ex.forward(a, xa[:, i : i + 1], i))
        outs_b.append(ex.forward(b, xb[:, i : i + 1], i))
    torch.testing.assert_close(torch.cat(outs_a, 1), ex.forward_once(xa), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(outs_b, 1), ex.forward_once(xb), atol=1e-5, rtol=1e-5)
    info = ex.sessions
    assert (info.count, info.tokens) == (2, 24)


def test_session_errors_leave_session_usable(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 2, 4)
    sid = ex.open_session(4)
    x = torch.randn(1, 3, 64)
    ex.forward(sid, x, 0)
    with pytest.raises(rt.PositionMismatch, match="a position of at most 3"):
        ex.forward(sid, x[:, :1], 4)  # past the length (below it is a rollback: test_runtime_rollback.py)
    with pytest.raises(rt.MaxLengthExceeded, match="max_length 4") as err:
        ex.forward(sid, x[:, :2], 3)
    assert err.value.code == rt.MaxLengthExceeded.code == 205
    with pytest.raises(rt.InvalidArgument, match=r"\[1, n"):
        ex.forward(sid, torch.randn(1, 1, 63), 3)
    with pytest.raises(rt.InvalidArgument):
        ex.forward(sid, torch.randn(2, 1, 64), 3)
    assert ex.session_length(sid) == 3
    ex.forward(sid, x[:, :1], 3)  # still fine after the rejected calls
    ex.close_session(sid)
    with pytest.raises(rt.UnknownSession) as err2:
        ex.forward(sid, x[:, :1], 4)
    assert err2.value.code == 201
    with pytest.raises(rt.UnknownSession):
        ex.close_session(b"\x00" * 16)
    with pytest.raises(rt.MaxLengthExceeded, match="context of 256"):
        ex.open_session(257)
    with pytest.raises(rt.InvalidArgument):
        ex.open_session(0)


def test_cache_budget_and_idle_eviction(tiny_models: dict[str, Path]) -> None:
    now = [100.0]
    path = str(tiny_models["llama"])
    probe = rt.load_span(path, 0, 2)
    per_token = probe.per_token_cache_bytes
    assert per_token == 2 * 2 * 2 * 16 * 4  # k+v, 2 layers, 2 kv heads, head_dim 16, fp32
    ex = rt.load_span(path, 0, 2, cache_bytes=per_token * 30, idle_timeout=10.0, clock=lambda: now[0])
    a = ex.open_session(20)
    b = ex.open_session(10)
    with pytest.raises(rt.SessionMemoryExhausted, match="needs 512 bytes, 0 of 15360 are free") as err:
        ex.open_session(1)
    assert err.value.code == 206
    assert ex.sessions.reserved_bytes == per_token * 30
    now[0] = 105.0
    ex.forward(b, torch.randn(1, 2, 64), 0)  # b was used at t=105, a last at t=100
    assert ex.evict_idle(109.0) == []
    assert ex.evict_idle(110.5) == [a]
    with pytest.raises(rt.UnknownSession):
        ex.forward(a, torch.randn(1, 1, 64), 0)
    c = ex.open_session(20)  # a's reservation was released
    assert sorted(ex.evict_idle(1000.0)) == sorted([b, c])
    assert ex.sessions.count == 0


def test_measure_throughput(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["qwen2"]), 0, 6, cache_bytes=0)
    tps = rt.measure_throughput(ex, n_tokens=4, prefill=4)
    assert tps > 0
    assert ex.sessions.count == 0
    assert ex.cache_bytes == 0


def test_model_id_pins_config_and_weights(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_models["llama"]
    info = rt.resolve_model(str(path))
    assert re.fullmatch(r"llama@[0-9a-f]{16}", info.model_id)
    assert (info.num_blocks, info.hidden_size, info.dtype) == (7, 64, torch.float32)
    assert rt.resolve_model(str(path)).model_id == info.model_id
    assert rt.load_span(str(path), 0, 1).model_id == info.model_id
    copy = shutil.copytree(path, tmp_path / "llama")
    assert rt.resolve_model(str(copy)).model_id == info.model_id  # same name, same bytes
    # One changed weight byte, or one changed config field, changes the id.
    changed = shutil.copytree(path, tmp_path / "x" / "llama")
    raw = bytearray((changed / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(raw))
    assert rt.resolve_model(str(changed)).model_id != info.model_id
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (copy / "config.json").write_text(json.dumps(cfg))
    assert rt.resolve_model(str(copy)).model_id != info.model_id


def _corrupt_all_but(path: Path, keep_prefixes: tuple[str, ...]) -> None:
    """Destroy every tensor outside ``keep_prefixes``: NaN-fill its bytes, and cut shards
    holding none of the kept tensors down to their header (their data is gone)."""
    for f in sorted(path.glob("*.safetensors")):
        raw = bytearray(f.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        names = [k for k in header if k != "__metadata__"]
        kept = [k for k in names if k.startswith(keep_prefixes)]
        if not kept:
            f.write_bytes(bytes(raw[: 8 + n]))
            continue
        for k in names:
            if k not in kept:
                lo, hi = header[k]["data_offsets"]
                raw[8 + n + lo : 8 + n + hi] = b"\xff" * (hi - lo)
        f.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_span_reads_only_its_tensors(kind: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models[kind]
    start, end = SPANS[kind][1]
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    expected = rt.load_span(str(src), start, end).forward_once(x)
    damaged = shutil.copytree(src, tmp_path / kind)
    _corrupt_all_but(damaged, tuple(f"model.layers.{i}." for i in range(start, end)))

    span = rt.load_span(str(damaged), start, end)
    torch.testing.assert_close(span.forward_once(x), expected, rtol=0, atol=0)

    # ... while anything that needs the other tensors sees the damage.
    other = (0, start) if start > 0 else (end, end + 1)
    if kind == "mistral":  # sharded: the other blocks' shards are truncated
        with pytest.raises(rt.ModelError, match="damaged"):
            rt.load_span(str(damaged), *other)
        with pytest.raises(SafetensorError, match="incomplete metadata"):  # transformers reads the truncated shard
            _reference(damaged)
    else:  # single file: the other tensors are NaN
        assert torch.isnan(rt.load_span(str(damaged), *other).forward_once(x)).all()
        ref = _reference(damaged)
        assert torch.isnan(ref(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_runs(quant: str, tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["llama"])
    head = rt.load_head(path)
    fp32 = [rt.load_span(path, a, b) for a, b in SPANS["llama"]]
    mixed = [fp32[0], rt.load_span(path, 1, 5, quant=quant), fp32[2]]
    assert mixed[1].quant == quant
    assert mixed[1].model_id == fp32[1].model_id  # quantization is a peer choice, not another model
    x = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(4))
    ref, out = fp32[1].forward_once(x), mixed[1].forward_once(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    print(f"{quant}: relative error of a 4-block span output = {rel:.3g}")
    # Random weights are the worst case for 4-bit codes (no structure to keep), so the
    # bound is loose; it still fails for garbage (an unrelated output is ~1.4).
    assert torch.isfinite(out).all()
    assert rel < {"int8": 0.1, "nf4": 0.6}[quant]
    import bitsandbytes as bnb

    linears = [m for m in mixed[1].layers.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
    assert len(linears) == 4 * 7
    assert {m.weight.dtype for m in linears} == {torch.int8 if quant == "int8" else torch.uint8}
    print(f"{quant}: span weights {mixed[1].weight_bytes} bytes vs fp32 {fp32[1].weight_bytes}")
    assert mixed[1].weight_bytes < fp32[1].weight_bytes / (3 if quant == "int8" else 6)
    params = rt.SamplingParams(max_new_tokens=8)
    a = rt.generate_local(head, fp32, _prompt(5), params)
    b = rt.generate_local(head, mixed, _prompt(5), params)
    agree = sum(x == y for x, y in zip(a, b)) / len(a)
    print(f"{quant}: greedy top-1 agreement with fp32 over 8 tokens = {agree:.2f}")
    assert len(b) == 8


def test_half_precision_on_cpu_runs(tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["qwen2"])
    ex32 = rt.load_span(path, 0, 6)
    ex16 = rt.load_span(path, 0, 6, dtype="bf16")
    assert ex16.dtype == torch.bfloat16
    assert ex16.per_token_cache_bytes * 2 == ex32.per_token_cache_bytes
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(6))
    out = ex16.forward_once(x)
    assert out.dtype == torch.bfloat16
    ref = ex32.forward_once(x)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.05


def test_chain_checks(tiny_models: dict[str, Path]) -> None:
    path = str(tiny_models["llama"])
    head = rt.load_head(path)
    a, c = rt.load_span(path, 0, 1), rt.load_span(path, 5, 7)
    with pytest.raises(rt.ModelError, match="contiguous"):
        rt.generate_local(head, [a, c], [1, 2], rt.SamplingParams(max_new_tokens=2))
    with pytest.raises(rt.ModelError, match="cover blocks"):
        rt.generate_local(head, [a], [1, 2], rt.SamplingParams(max_new_tokens=2))
    other = rt.load_span(str(tiny_models["mistral"]), 1, 5)
    with pytest.raises(rt.ModelError, match="serves mistral@"):
        rt.check_chain(head, [a, other])
    with pytest.raises(rt.InvalidArgument, match="token ids"):
        head.embed([96])


def test_sub_range_sessions(tiny_models: dict[str, Path]) -> None:
    """A session (or a stateless forward) may run a sub-range of the served blocks."""
    path = str(tiny_models["qwen2"])
    ex = rt.load_span(path, 1, 6)
    parts = [rt.load_span(path, 1, 3), rt.load_span(path, 3, 6)]
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(7))
    for (a, b), part in zip([(1, 3), (3, 6)], parts, strict=True):
        expected = part.forward_once(x)
        torch.testing.assert_close(ex.forward_once(x, start=a, end=b), expected, rtol=0, atol=0)
        sid = ex.open_session(12, start=a, end=b)
        got = torch.cat([ex.forward(sid, x[:, :5], 0)] + [ex.forward(sid, x[:, i : i + 1], i) for i in range(5, 12)], 1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    whole = ex.open_session(12)  # the full span still works after sub-range runs
    torch.testing.assert_close(ex.forward(whole, x, 0), parts[1].forward_once(parts[0].forward_once(x)),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(rt.InvalidArgument, match="sub-range"):
        ex.open_session(4, start=0, end=3)


def test_sessions_compute_concurrently_in_threads(tiny_models: dict[str, Path]) -> None:
    """Several sessions, whole-span and sub-range ones, stepping in several threads at
    once (a server with --compute-slots > 1) compute what they compute one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    path = str(tiny_models["qwen2"])
    ex = rt.load_span(path, 1, 6)
    ranges = [(1, 6), (1, 6), (3, 6), (1, 3), (1, 6), (3, 6)]
    inputs = [torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(i)) for i in range(len(ranges))]

    def steps(sid: bytes, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([ex.forward(sid, x[:, :4], 0)] + [ex.forward(sid, x[:, t:t + 1], t) for t in range(4, 10)], 1)

    def run_all(pool: ThreadPoolExecutor | None) -> list[torch.Tensor]:
        # sessions open and close on this thread (the server's); only their steps run elsewhere
        sids = [ex.open_session(10, start=a, end=b) for a, b in ranges]
        if pool is None:
            outs = [steps(sid, x) for sid, x in zip(sids, inputs, strict=True)]
        else:
            outs = list(pool.map(steps, sids, inputs))
        for sid in sids:
            ex.close_session(sid)
        return outs

    alone = run_all(None)
    with ThreadPoolExecutor(max_workers=len(ranges)) as pool:
        for _ in range(3):
            for a, b in zip(alone, run_all(pool), strict=True):
                torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert ex.sessions.count == 0


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_a_step_in_pieces_is_the_same_bits_as_in_one_call(kind: str, tiny_models: dict[str, Path]) -> None:
    # The server computes big steps a few blocks at a time (one scheduler grant each),
    # so that no piece holds the compute slot for long: the output must not change.
    ex = rt.load_span(str(tiny_models[kind]), *SPANS[kind][-1])
    x = torch.randn(1, 30, ex.hidden_size, generator=torch.Generator().manual_seed(4))
    whole, pieces = ex.open_session(31), ex.open_session(31)
    expected = [ex.forward(whole, x[:, :29], 0), ex.forward(whole, x[:, 29:], 29)]
    job = ex.forward_job(pieces, x[:, :29], 0, quantum=29)  # one block per piece
    assert len(job.pieces) == ex.num_blocks
    assert sum(w for w, _ in job.pieces) == 29 * ex.num_blocks
    for _, piece in job.pieces:
        piece()
    assert ex.session_length(pieces) == 29
    got = [job.result(), ex.forward(pieces, x[:, 29:], 29)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_a_long_forward_once_is_chunked_within_the_cache_budget(tiny_models: dict[str, Path]) -> None:
    ex = rt.load_span(str(tiny_models["llama"]), 0, 4)
    x = torch.randn(1, 100, ex.hidden_size, generator=torch.Generator().manual_seed(5))
    job = ex.forward_once_job(x, quantum=64, chunk_tokens=32)
    assert [w for w, _ in job.pieces] == [64, 64] * 3 + [16]  # 3 chunks of 32 (2 blocks a piece), then 4 tokens
    assert max(w for w, _ in job.pieces) <= 64
    torch.testing.assert_close(job.run(), ex.forward_once(x), atol=1e-5, rtol=1e-5)
    small = rt.load_span(str(tiny_models["llama"]), 0, 4, cache_bytes=ex.transient_bytes(50))
    small.reserve(small.transient_bytes(50))
    with pytest.raises(rt.SessionMemoryExhausted):
        small.open_session(1)
    small.release(small.transient_bytes(50))
    small.open_session(50)
