"""Model runtime benchmark: chain speed vs transformers, and memory of a span vs the whole model.

1. Speed. SmolLM2-135M-Instruct (the built-in GGUF), fp32 on CPU: greedy decode of the
   same prompt by the 3-span in-process chain [0,10) [10,20) [20,30) + client head, and by
   ``transformers`` ``generate`` on the full model, alternating, in this run. Prints
   tokens/s for both and their ratio (the design expects ~1.0: same layers, same work).
2. Memory. A random-init ~1B-parameter Llama (hidden 2048, 16 layers, intermediate
   5632, 32 heads, vocab 32000) is saved as sharded safetensors to a temp dir; separate
   processes then load (a) blocks [0, 6) (~1/3 of the parameters), (b) the whole model
   through this runtime (all 16 blocks + head), (c) the whole model through
   ``AutoModelForCausalLM.from_pretrained``, (d) nothing (imports only: the fixed
   overhead). Each runs one forward and reports its peak RSS (VmHWM); ratios are printed.

Run: ``.venv/bin/python bench/runtime.py [--tokens 64] [--repeats 3] [--skip-speed] [--skip-rss]``.
Timings on a shared machine are noisy: compare the ratio, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
SPAN = (0, 6)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def bench_speed(tokens: int, repeats: int) -> None:
    import torch

    import peer.runtime as rt
    from peer.runtime._sources import builtin_gguf_path
    from transformers import AutoModelForCausalLM

    model = rt.DEFAULT_MODEL
    head = rt.load_head(model)
    spans = [rt.load_span(model, a, b) for a, b in ((0, 10), (10, 20), (20, 30))]
    path = builtin_gguf_path(model)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = head.encode_prompt(PROMPT)
    params = rt.SamplingParams(max_new_tokens=tokens)
    ref_kwargs = dict(
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
    )
    # Warm up both (first calls allocate and pick kernels).
    rt.generate_local(head, spans, ids, rt.SamplingParams(max_new_tokens=4))
    ref.generate(torch.tensor([ids]), **{**ref_kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    ours_tps, ref_tps = [], []
    same = True
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = rt.generate_local(head, spans, ids, params)
        ours_tps.append(len(out) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        with torch.inference_mode():
            seq = ref.generate(torch.tensor([ids]), **ref_kwargs)[0, len(ids):].tolist()
        ref_tps.append(len(seq) / (time.perf_counter() - t0))
        same = same and seq[: len(out)] == out
    o, r = statistics.median(ours_tps), statistics.median(ref_tps)
    print(f"speed: SmolLM2-135M fp32, prompt {len(ids)} tokens, {tokens} new tokens, median of {repeats}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  3-span in-process chain : {o:7.2f} tok/s  (runs: {', '.join(f'{x:.1f}' for x in ours_tps)})")
    print(f"  transformers generate   : {r:7.2f} tok/s  (runs: {', '.join(f'{x:.1f}' for x in ref_tps)})")
    print(f"  ratio chain/generate    : {o / r:.3f}   tokens identical: {same}")


# -- memory -----------------------------------------------------------------------------

_CHILD = r"""
import json, sys, torch
mode, path = sys.argv[1], sys.argv[2]
import peer.runtime as rt
from transformers import AutoModelForCausalLM
x = torch.randn(1, 8, {hidden})
if mode == "span":
    ex = rt.load_span(path, {a}, {b})
    ex.forward_once(x)
elif mode == "whole":
    head = rt.load_head(path)
    ex = rt.load_span(path, 0, {layers})
    head.logits(ex.forward_once(head.embed(list(range(8)))))
elif mode == "transformers":
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        m(torch.arange(8)[None])
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child
# of a big parent would report the parent's size. VmHWM belongs to this address space.
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"mode": mode, "peak_rss_mib": peak_kib / 1024}}))
"""

_MAKE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(**{cfg})
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
print(sum(p.numel() for p in model.parameters()))
model.save_pretrained(sys.argv[1], max_shard_size="1GB")
"""


def _run_child(code: str, *args: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child {args[:1]} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def bench_rss() -> None:
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        env = {**os.environ, "SWARM_PEER_CACHE": str(Path(tmp) / "cache")}
        model_dir = Path(tmp) / "llama-1b"
        t0 = time.perf_counter()
        n_params = int(_run_child(_MAKE.format(cfg=repr(BIG)), str(model_dir), env=env))
        print(f"memory: random-init Llama, {n_params / 1e9:.2f}B parameters, saved in "
              f"{time.perf_counter() - t0:.0f} s ({sum(f.stat().st_size for f in model_dir.iterdir()) / 2**30:.1f} GiB)")
        code = _CHILD.format(hidden=BIG["hidden_size"], a=SPAN[0], b=SPAN[1], layers=BIG["num_hidden_layers"])
        # Hash the files once (model id digests are memoised in the cache) so no child pays it.
        _run_child("import peer.runtime as rt, sys; rt.resolve_model(sys.argv[1]); print('ok')", str(model_dir), env=env)
        peak = {}
        for mode in ("imports", "span", "whole", "transformers"):
            peak[mode] = json.loads(_run_child(code, mode, str(model_dir), env=env))["peak_rss_mib"]
        h, i = BIG["hidden_size"], BIG["intermediate_size"]
        per_block = 4 * h * h + 3 * h * i + 2 * h
        frac = (SPAN[1] - SPAN[0]) * per_block / n_params
        base = peak["imports"]
        print(f"  imports only (overhead)      : {base:8.0f} MiB")
        print(f"  span {SPAN} ({frac:.1%} of params): {peak['span']:8.0f} MiB")
        print(f"  whole model, this runtime    : {peak['whole']:8.0f} MiB")
        print(f"  whole model, transformers    : {peak['transformers']:8.0f} MiB")
        print(f"  ratio span/whole (runtime)   : {peak['span'] / peak['whole']:.3f}  "
              f"(expected {frac:.3f} plus overhead; net of imports: "
              f"{(peak['span'] - base) / (peak['whole'] - base):.3f})")
        print(f"  ratio span/whole (transformers): {peak['span'] / peak['transformers']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        bench_speed(args.tokens, args.repeats)
    if not args.skip_rss:
        bench_rss()


if __name__ == "__main__":
    main()
