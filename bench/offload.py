"""Offloading vs the swarm (Petals' headline; issue 14 section 5; DESIGN.md, "Performance targets").

A random-init Llama of about 3 GB of fp32 weights (14 layers, hidden 2048, intermediate
5632, 16 heads, vocab 8192; sharded safetensors built from the config, cached under
``--cache-dir`` so reruns are quick) is larger than the memory ``M`` (``--cap``, bytes)
that each process gets. Both sides run greedy decoding of the same prompt:

* offload: one process capped to M with the cgroup v1 memory controller runs the whole
  model with its weights memory-mapped from the safetensors files (``--offload mmap``,
  zero-copy) or with accelerate's disk offload (``--offload accelerate``). Page cache
  is charged to the group, so whatever does not fit under M is read from disk again
  for every token; the worker reports the bytes it really read per step
  (``/proc/self/io``). The files are dropped from the page cache first
  (``POSIX_FADV_DONTNEED``: pages cached by another group would not be charged here).
* swarm: three ``swarm-peer serve`` processes, each capped to the same M in its own
  group and holding a third of the blocks, each on its own loopback address
  (``bench/wanem``), a client here; relayed over plain loopback, then over the emulated
  network: every link 25 Mbit/s with a one-way delay of 20 ms (40 ms round trip); on
  each, a push client and a star client (``--relay``), each on servers of its own: push
  measured after a star client on the same servers ran 18% slower over the emulated
  links (0.420 against 0.355 s a step; not explained).

Prints decode steps/s of each, the ratios (goal >= 10x) and whether the tokens agree.
Everything it starts (processes, cgroups, the proxy) is stopped and removed on any exit,
SIGTERM and Ctrl-C included; a cgroup left by a SIGKILLed run is swept by the next.

Run (as root, where cgroup v1 memory is mounted): ``.venv/bin/python bench/offload.py
[--cap BYTES] [--offload mmap|accelerate] [--offload-tokens 5] [--swarm-tokens 16]
[--threads N] [--offload-threads N] [--cache-dir DIR] [--skip-wan] [--relay star|push|both]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on sys.path, the repo root is not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import trio  # noqa: E402

from bench import _memcap  # noqa: E402
from bench.wanem import EmulatedSwarm, ServerSpec, Topology, die_with_parent, exit_on_sigterm  # noqa: E402

CONFIG = dict(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=14, num_attention_heads=16,
              num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-5, initializer_range=0.02,
              tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
SPANS = ((0, 5), (5, 10), (10, 14))
PROMPT = [11, 503, 77, 2048, 9, 4111, 630, 18]
DEFAULT_CAP = 1_750 * 2**20  # M: a third of the model plus a process's own needs, far from the whole
GiB = 2**30


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the model --------------------------------------------------------------------------------


def build_model(cache_dir: Path) -> Path:
    """The random Llama as sharded safetensors (one file per layer, one for the head), built
    tensor by tensor (never the whole model in memory) and cached by its config's hash."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    key = hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"offload-llama-{key}"
    if (path / "complete").is_file():
        return path
    config = LlamaConfig(**CONFIG)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).state_dict().items()}
    total = sum(torch.Size(s).numel() for s in shapes.values()) * 4
    free = _free_bytes(cache_dir)
    if free < total * 1.1:
        sys.exit(f"offload bench: {total / GiB:.1f} GiB needed in {cache_dir}, {free / GiB:.1f} GiB free; "
                 f"use --cache-dir")
    print(f"  building the model ({total / GiB:.2f} GiB of fp32) in {path} (once; cached) ...", flush=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{path.name}."))
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if name.startswith("model.layers.") else "head"
        groups.setdefault(group, []).append(name)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    files = sorted(groups)
    for i, group in enumerate(files):
        filename = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = {}
        for name in groups[group]:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name])
            else:
                tensors[name] = torch.randn(shapes[name], generator=gen) * CONFIG["initializer_range"]
            weight_map[name] = filename
        save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    config.save_pretrained(tmp)
    (tmp / "complete").write_text("")
    os.replace(tmp, path)
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def drop_page_cache(files: list[Path]) -> None:
    """Evict these files' pages (only theirs), so the capped process faults them in itself."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- the offload worker (runs in its own capped process) ----------------------------------------


def mmap_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor as a zero-copy view of its memory-mapped file (private, copy-on-write)."""
    import numpy as np

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="c")
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert info["dtype"] == "F32", info
            begin, end = info["data_offsets"]
            view = data[base + begin: base + end].view(np.float32).reshape(info["shape"])
            out[name] = torch.from_numpy(view)
    return out


def load_offloaded(model_dir: Path, mode: str, offload_dir: Path) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(model_dir)
    if mode == "mmap":
        with init_empty_weights():  # parameters on the meta device, buffers (rotary) real
            model = LlamaForCausalLM(config)
        model.load_state_dict(mmap_state_dict(model_dir), assign=True, strict=True)
        return model.eval()
    # transformers' from_pretrained with a "disk" device map is accelerate's disk offload;
    # with safetensors it reads offloaded weights from the original files (no copy).
    device_map: dict[str, str] = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                                  "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)})
    model = LlamaForCausalLM.from_pretrained(model_dir, device_map=device_map, offload_folder=str(offload_dir),
                                             dtype=torch.float32)
    return model.eval()


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def worker(args: argparse.Namespace) -> None:
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_offloaded(Path(args.model), args.offload, Path(args.offload_dir))
    load_s = time.perf_counter() - t0
    stamps: list[tuple[float, int]] = []

    class Stamps(BaseStreamer):
        def put(self, value: torch.Tensor) -> None:  # first call: the prompt; then one per token
            stamps.append((time.perf_counter(), _read_bytes()))

        def end(self) -> None:
            pass

    ids = torch.tensor([PROMPT])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                             do_sample=False, streamer=Stamps())
    total = time.perf_counter() - t0
    tokens = out[0, len(PROMPT):].tolist()
    (first, first_read), (last, last_read) = stamps[1], stamps[-1]
    steps = len(stamps) - 2
    print("RESULT " + json.dumps({
        "tokens": tokens, "load_s": load_s, "ttft": first - t0, "total": total,
        "steps_per_second": steps / (last - first) if steps > 0 else 0.0,
        "read_per_step": (last_read - first_read) / steps if steps > 0 else 0.0,
    }), flush=True)


def run_offload(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    drop_page_cache(weight_files(model_dir))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.offload_threads), "TQDM_DISABLE": "1"}
    with _memcap.MemoryCgroup("offload", args.cap) as group, \
            tempfile.TemporaryDirectory(prefix="offload-bench-") as offload_dir:  # removed here even if it is killed
        cmd = [sys.executable, __file__, "--worker", "--model", str(model_dir), "--offload", args.offload,
               "--tokens", str(args.offload_tokens), "--threads", str(args.offload_threads),
               "--offload-dir", offload_dir]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env,
                                preexec_fn=die_with_parent(group.join))
        try:
            out, _ = proc.communicate(timeout=args.offload_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            sys.exit(f"offload bench: the offload worker took over {args.offload_timeout:.0f} s; use fewer "
                     f"--offload-tokens")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        usage, fails, ooms = group.max_usage, group.failcnt, group.oom_kills
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        why = f" (OOM-killed {ooms}x: raise --cap)" if ooms else ""
        sys.exit(f"offload bench: the offload worker failed with code {proc.returncode}{why}")
    result = json.loads(line[len("RESULT "):])
    result.update(max_usage=usage, failcnt=fails)
    return result


# -- the swarm ---------------------------------------------------------------------------------


async def _generate(emu: EmulatedSwarm, n: int, relay: str) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        swarm = await emu.connect(nursery, "client", audit=None, step_timeout=120.0, relay=relay)
        await swarm.generate(PROMPT, max_new_tokens=3, chat=False)  # warm-up: routes, connections, sessions
        result = await swarm.generate(PROMPT, max_new_tokens=n, chat=False)
        await swarm.aclose()
    decode = result.total_seconds - result.time_to_first_token
    steps = len(result.token_ids) - 1
    return {"tokens": result.token_ids, "ttft": result.time_to_first_token, "total": result.total_seconds,
            "steps_per_second": steps / decode if steps > 0 and decode > 0 else 0.0}


def run_swarm(args: argparse.Namespace, model_dir: Path, workdir: Path, *, wan: bool, relay: str) -> dict[str, Any]:
    names = ["peer0", "peer1", "peer2"]
    topo = Topology.make([("client", "lan"), *((n, "lan") for n in names)],
                         intra_rtt_ms=2 * args.wan_one_way_ms if wan else 0.0,
                         bandwidth_mbit=args.wan_mbit if wan else None)
    groups = [_memcap.MemoryCgroup(f"{'wan' if wan else 'lo'}-{relay}-{n}", args.cap) for n in names]
    drop_page_cache(weight_files(model_dir))  # each server's group pays for the pages it reads
    try:
        for group in groups:
            group.create()
        specs = [ServerSpec(node=n, blocks=span, preexec=g.join) for n, span, g in zip(names, SPANS, groups)]
        env = {"SWARM_PEER_CACHE": os.environ["SWARM_PEER_CACHE"]}
        t0 = time.perf_counter()
        with EmulatedSwarm(topo, str(model_dir), specs, workdir=workdir / f"{'wan' if wan else 'loopback'}-{relay}",
                           threads=args.threads, proxy=wan, env=env, timeout=args.start_timeout) as emu:
            start_s = time.perf_counter() - t0
            if wan:
                print(f"  {emu.overhead_line}", flush=True)
            result = trio.run(_generate, emu, args.swarm_tokens, relay)
            result["rss_cache"] = [(st.get("rss", 0), st.get("cache", 0)) for st in (g.stat() for g in groups)]
        result.update(start_s=start_s, max_usage=[g.max_usage for g in groups],
                      oom_kills=sum(g.oom_kills for g in groups), proxy_report=emu.proxy_report)
        return result
    finally:
        for group in groups:
            group.destroy()


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=DEFAULT_CAP, help="M: bytes per process (cgroup memory limit)")
    parser.add_argument("--offload", choices=("mmap", "accelerate"), default="mmap")
    parser.add_argument("--offload-tokens", type=int, default=5, help="new tokens for the offload baseline")
    parser.add_argument("--swarm-tokens", type=int, default=16, help="new tokens for each swarm run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of each server process (default: every core, as the offload process "
                             "has: the chain's servers compute one after another)")
    parser.add_argument("--offload-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the offload process (default: every core; it runs alone)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("SWARM_BENCH_CACHE", Path(tempfile.gettempdir()) /
                                                    "swarm-peer-bench")))
    parser.add_argument("--skip-wan", action="store_true", help="only the loopback swarm")
    parser.add_argument("--relay", choices=("star", "push", "both"), default="both",
                        help="the client's relay mode(s), each on servers of its own")
    parser.add_argument("--wan-one-way-ms", type=float, default=20.0, help="emulated links: one-way delay (ms)")
    parser.add_argument("--wan-mbit", type=float, default=25.0, help="emulated links: bandwidth (Mbit/s)")
    parser.add_argument("--offload-timeout", type=float, default=400.0)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    exit_on_sigterm()
    print(f"offload bench: cpus {os.cpu_count()}, load average {load_average()}", flush=True)
    print(f"  {_memcap.describe()}", flush=True)
    reason = _memcap.unavailable_reason()
    if reason is not None:
        sys.exit(f"offload bench needs memory cgroups: {reason}")
    stale = _memcap.sweep_stale()
    if stale:
        print(f"  removed cgroups left by an earlier run: {', '.join(stale)}", flush=True)
    model_dir = build_model(args.cache_dir)
    os.environ["SWARM_PEER_CACHE"] = str(args.cache_dir / "swarm-peer-cache")  # digests memoised across runs
    from peer.runtime import resolve_model

    t0 = time.perf_counter()
    info = resolve_model(str(model_dir))  # hashes the weights once (memoised) so the servers start fast
    size = sum(p.stat().st_size for p in weight_files(model_dir))
    print(f"  model {info.model_id[:40]}..., {info.num_blocks} blocks, {size / GiB:.2f} GiB of weights "
          f"(resolved in {time.perf_counter() - t0:.1f} s); M = {args.cap / GiB:.2f} GiB per process, "
          f"{size / args.cap:.1f}x smaller than the model", flush=True)

    print(f"\n== offload: one process capped to M, {args.offload} ({args.offload_threads} threads), "
          f"{args.offload_tokens} new tokens, load average {load_average()}", flush=True)
    off = run_offload(args, model_dir)
    print(f"  loaded in {off['load_s']:.1f} s, first token after {off['ttft']:.1f} s, "
          f"{off['steps_per_second']:.3f} decode steps/s, read from disk per step {off['read_per_step'] / GiB:.2f} "
          f"GiB; peak charged {off['max_usage'] / GiB:.2f} GiB, cap hit {off['failcnt']} times", flush=True)

    runs: dict[tuple[str, str], dict[str, Any]] = {}
    relays = ("push", "star") if args.relay == "both" else (args.relay,)
    with tempfile.TemporaryDirectory(prefix="offload-bench-swarm-") as tmp:
        for wan in ((False,) if args.skip_wan else (False, True)):
            what = (f"emulated {args.wan_mbit:g} Mbit/s, {args.wan_one_way_ms:g} ms one-way links" if wan
                    else "loopback")
            for relay in relays:  # fresh servers for each (see the docstring)
                print(f"\n== swarm: 3 serve processes, each capped to M, spans {list(SPANS)}, {what}, {relay} relay, "
                      f"{args.swarm_tokens} new tokens, load average {load_average()}", flush=True)
                r = runs["wan" if wan else "loopback", relay] = run_swarm(args, model_dir, Path(tmp), wan=wan,
                                                                          relay=relay)
                peaks = ", ".join(f"{u / GiB:.2f}" for u in r["max_usage"])
                now = ", ".join(f"{rss / GiB:.2f}+{cache / GiB:.2f}" for rss, cache in r["rss_cache"])
                print(f"  servers up in {r['start_s']:.0f} s; charged to each server's group: peak {peaks} GiB, at "
                      f"the end rss+cache {now} GiB; OOM kills {r['oom_kills']}", flush=True)
                print(f"  first token after {r['ttft']:.2f} s, {r['steps_per_second']:.2f} decode steps/s", flush=True)

    print(f"\n== offload vs swarm (decode steps/s; M = {args.cap / GiB:.2f} GiB per process, model "
          f"{size / GiB:.2f} GiB), load average {load_average()}")
    print(f"  {'configuration':52s} {'steps/s':>9s} {'s/step':>8s} {'vs offload':>11s}")
    names = {"loopback": "loopback", "wan": f"{args.wan_mbit:g} Mbit/s, {args.wan_one_way_ms:g} ms one-way"}
    rows = [(f"offload, 1 process ({args.offload})", off)]
    rows += [(f"swarm, 3 processes, {names[network]}, {relay}", r) for (network, relay), r in runs.items()]
    for name, r in rows:
        sps = r["steps_per_second"]
        print(f"  {name:52s} {sps:9.3f} {1 / sps if sps else float('inf'):8.3f} "
              f"{sps / off['steps_per_second']:10.1f}x")
    n = min(len(off["tokens"]), *(len(r["tokens"]) for r in runs.values()))
    same = all(r["tokens"][:n] == off["tokens"][:n] for r in runs.values())
    print(f"  tokens identical (first {n}): {same}")
    for network in dict.fromkeys(network for network, _ in runs):  # per network, with the relay's best mode
        best = max(r["steps_per_second"] for (net, _), r in runs.items() if net == network)
        print(f"  goal (DESIGN.md): swarm >= 10x offloading, {network}: {best / off['steps_per_second']:.1f}x",
              flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
