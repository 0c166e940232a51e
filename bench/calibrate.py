"""Measure honest disagreement between peers and print calibrated audit thresholds.

    python bench/calibrate.py [--smollm] [--steps 24] [--json out.json]
    python bench/calibrate.py --record MODEL [--record-dir DIR]
    python -m bench.calibrate ...           (the same, from the repository root)

Theory of operation. An audit compares a hop's signed output for one step of a
KV-cache session with an independent peer's FORWARD_ONCE of the hop's whole input
prefix (``verify._compare``). Honest peers differ only by floating-point order, so
this tool reproduces every such difference on real spans and records the worst value
of each statistic per span depth:

- ``decode``: the session path (prefill, then one token per step) against a one-shot
  ``forward_once`` of the prefix up to that step, exactly the audit's situation;
- ``threads``: ``forward_once`` with 1 torch thread against 2 threads;
- wire dtypes: an honest f32 output against its f16/bf16/q8/nf4 wire round trip
  (the audit's reference is f32; the claimed output travelled in the wire dtype).

For contrast it also measures two cheats: int8 weights (bitsandbytes, announced as
fp32) and a skipped block, to show the margin between the thresholds and the smallest
cheat.

``--record MODEL`` instead measures the activation range of MODEL (spec 13.3, "Input
bounds"): the RMS of every row of the hidden states entering each block, over 24
random-token prompts and a few natural ones, and writes the calibration record that
verifiers use to call proofs with out-of-range inputs inconclusive
(``verify._bounds``), into ``verify/calibration/`` (or ``--record-dir``). Models: tiny random Llamas built from a config (the tests' and the design's
bench model) and, with ``--smollm``, spans of SmolLM2-135M-Instruct. fp32 on CPU only:
fp16/bf16 *compute* needs a GPU run (none on the build machines), see ``verify._compare``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from protocol import decode_tensor, encode_tensor
from verify import MARGIN, NormBounds, bounds_from_activations, record_path, row_statistics

__all__ = ["Worst", "measure_model", "record_bounds", "main"]

NATURAL_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    if n < 2:",
                   "Once upon a time, in a land far away, there lived")

WIRE_DTYPES = ("f16", "bf16", "q8", "nf4")


@dataclass(slots=True)
class Worst:
    """Worst honest values of the three statistics over many rows."""

    rel_l2: float = 0.0
    cos_gap: float = 0.0
    topk: float = 1.0
    rows: int = 0

    def add(self, claimed: torch.Tensor, reference: torch.Tensor) -> None:
        rel, cos, agree = row_statistics(claimed, reference)
        self.rel_l2 = max(self.rel_l2, float(rel.max()))
        self.cos_gap = max(self.cos_gap, float((1 - cos).max()))
        self.topk = min(self.topk, float(agree.min()))
        self.rows += rel.numel()

    def as_dict(self) -> dict:
        return {"rel_l2": self.rel_l2, "cos_gap": self.cos_gap, "topk": self.topk, "rows": self.rows}


@dataclass(slots=True)
class Report:
    model: str
    by_depth: dict[int, dict[str, Worst]] = field(default_factory=dict)

    def worst(self, depth: int, kind: str) -> Worst:
        return self.by_depth.setdefault(depth, {}).setdefault(kind, Worst())


def _tiny_llama(path: str, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                vocab: int, seed: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


def _spans(num_blocks: int, depths: Iterable[int]) -> list[tuple[int, int]]:
    out = []
    for d in depths:
        if d > num_blocks:
            continue
        starts = sorted({0, (num_blocks - d) // 2, num_blocks - d})
        out += [(s, s + d) for s in starts]
    return out


def measure_model(source: str, *, depths: Sequence[int], prompt_len: int = 12, steps: int = 24, seed: int = 0,
                  cheats: bool = True) -> Report:
    """Run every honest comparison of the module docstring on spans of ``source``."""
    from peer.runtime import load_head, load_span

    head = load_head(source)
    full = load_span(source, 0, head.num_blocks)
    report = Report(model=full.model_id)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, head.vocab_size, (prompt_len + steps,), generator=gen).tolist()
    embedded = head.embed(ids).to(torch.float32)
    int8 = None
    if cheats:
        try:
            int8 = load_span(source, 0, head.num_blocks, quant="int8")
        except Exception as exc:  # bitsandbytes missing: the cheat rows are just left out
            print(f"(int8 cheat not measured: {exc})")
    threads = torch.get_num_threads()
    with torch.inference_mode():
        for start, end in _spans(head.num_blocks, depths):
            depth = end - start
            x = full.forward_once(embedded, start=0, end=start) if start else embedded
            # decode path: one session, prefill then one token per step
            sid = full.open_session(prompt_len + steps, start=start, end=end)
            outs = [full.forward(sid, x[:, :prompt_len], 0)]
            for t in range(prompt_len, prompt_len + steps):
                outs.append(full.forward(sid, x[:, t:t + 1], t))
            full.close_session(sid)
            position = 0
            for out in outs:
                n = out.shape[1]
                once = full.forward_once(x[:, :position + n], start=start, end=end)[:, -n:]
                report.worst(depth, "decode").add(out, once)
                for wire in WIRE_DTYPES:
                    report.worst(depth, f"wire-{wire}").add(decode_tensor(encode_tensor(out, wire)), once)
                position += n
            reference = full.forward_once(x, start=start, end=end)
            torch.set_num_threads(1)
            try:
                single = full.forward_once(x, start=start, end=end)
            finally:
                torch.set_num_threads(threads)
            report.worst(depth, "threads").add(single, reference)
            if int8 is not None:
                report.worst(depth, "cheat-int8").add(int8.forward_once(x, start=start, end=end), reference)
            if depth > 1:
                skipped = full.forward_once(x, start=start, end=end - 1)
                report.worst(depth, "cheat-skip-block").add(skipped, reference)
    return report


def record_bounds(source: str, *, prompts: int = 24, length: int = 32, seed: int = 0) -> NormBounds:
    """The activation range of every block of ``source`` (module docstring)."""
    from peer.runtime import load_head, load_span

    head = load_head(source)
    full = load_span(source, 0, head.num_blocks)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, head.vocab_size, (length,), generator=gen).tolist() for _ in range(prompts)]
    try:
        batches += [head.encode_prompt(p, chat=False) for p in NATURAL_PROMPTS]
    except Exception:  # a model without a tokenizer: random tokens only
        pass
    inputs: dict[int, list[torch.Tensor]] = {b: [] for b in range(head.num_blocks)}
    with torch.inference_mode():
        for ids in batches:
            x = head.embed(ids).to(torch.float32)
            for block in range(head.num_blocks):
                inputs[block].append(x)
                x = full.forward_once(x, start=block, end=block + 1)
    return bounds_from_activations(full.model_id, inputs)


def _fit(reports: Sequence[Report], kinds: Sequence[str]) -> dict[str, float]:
    """Largest honest value per statistic, with the depth slope of rel L2 (least squares
    through the per-depth maxima of every model)."""
    points = []
    cos_gap, topk = 0.0, 1.0
    for report in reports:
        for depth, by_kind in report.by_depth.items():
            worst_rel = max((by_kind[k].rel_l2 for k in kinds if k in by_kind), default=0.0)
            points.append((depth, worst_rel))
            cos_gap = max([cos_gap, *(by_kind[k].cos_gap for k in kinds if k in by_kind)])
            topk = min([topk, *(by_kind[k].topk for k in kinds if k in by_kind)])
    n = len(points)
    mean_d = sum(d for d, _ in points) / n
    mean_r = sum(r for _, r in points) / n
    var = sum((d - mean_d) ** 2 for d, _ in points)
    slope = max(sum((d - mean_d) * (r - mean_r) for d, r in points) / var, 0.0) if var else 0.0
    # the envelope: the smallest base such that base + slope * d covers every point
    base = max(r - slope * d for d, r in points)
    return {"rel_l2_base": base, "rel_l2_per_block": slope, "cos_gap": cos_gap, "topk": topk}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm", action="store_true", help="also measure SmolLM2-135M-Instruct spans")
    parser.add_argument("--steps", type=int, default=24, help="decode steps per span")
    parser.add_argument("--json", help="write the raw measurements to this file")
    parser.add_argument("--record", metavar="MODEL", help="write MODEL's calibration record (input bounds) instead")
    parser.add_argument("--record-dir", help="where to write it (default: verify/calibration/)")
    args = parser.parse_args(argv)
    if args.record:
        bounds = record_bounds(args.record)
        path = record_path(bounds.model, args.record_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(bounds.to_json() + "\n")
        for block, (lo, hi) in sorted(bounds.blocks.items()):
            print(f"block {block:3d}: row RMS {lo:.3g} .. {hi:.3g}")
        print(f"wrote {path} ({bounds.model})")
        return 0
    torch.set_num_threads(max(torch.get_num_threads(), 2))
    t0 = time.perf_counter()
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = [
            ("tiny-h64", dict(hidden=64, intermediate=128, layers=6, heads=4, kv_heads=2, vocab=1000, seed=0)),
            ("tiny-h256", dict(hidden=256, intermediate=688, layers=4, heads=4, kv_heads=4, vocab=1000, seed=1)),
        ]
        for name, cfg in tiny:
            path = _tiny_llama(f"{tmp}/{name}", **cfg)
            reports.append(measure_model(path, depths=(1, 2, 3, 4, 6), steps=args.steps))
        if args.smollm:
            reports.append(measure_model("smollm2-135m-instruct", depths=(1, 3, 10, 30), steps=args.steps))
    print(f"measured in {time.perf_counter() - t0:.0f} s (fp32, CPU, {torch.get_num_threads()} threads)\n")
    print(f"{'model':34} {'depth':>5} {'kind':17} {'max rel_l2':>11} {'max 1-cos':>11} {'min topk':>9}")
    for report in reports:
        for depth in sorted(report.by_depth):
            for kind, w in sorted(report.by_depth[depth].items()):
                print(f"{report.model[:34]:34} {depth:5d} {kind:17} {w.rel_l2:11.3g} {w.cos_gap:11.3g} {w.topk:9.2f}")
    print()
    fits = {"f32": _fit(reports, ("decode", "threads"))}
    for wire in WIRE_DTYPES:
        fits[wire] = _fit(reports, (f"wire-{wire}",))
    for name, fit in fits.items():
        print(f"{name:5} honest envelope: rel_l2 <= {fit['rel_l2_base']:.3g} + {fit['rel_l2_per_block']:.3g} * depth,"
              f" 1-cos <= {fit['cos_gap']:.3g}, topk >= {fit['topk']:.2f}"
              f"  -> thresholds x{MARGIN:g}: rel_l2 <= {MARGIN * fit['rel_l2_base']:.3g} + "
              f"{MARGIN * fit['rel_l2_per_block']:.3g} * depth, 1-cos <= {MARGIN * fit['cos_gap']:.3g}")
    cheat = [w.rel_l2 for r in reports for by in r.by_depth.values() for k, w in by.items() if k.startswith("cheat")]
    if cheat:
        print(f"smallest cheat rel_l2 measured: {min(cheat):.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reports": [{"model": r.model, "by_depth": {d: {k: w.as_dict() for k, w in by.items()}
                                                                    for d, by in r.by_depth.items()}}
                                   for r in reports], "fits": fits}, f, indent=1,
                      default=lambda v: None if isinstance(v, float) and math.isinf(v) else v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
