"""Speculative decoding through a real swarm on loopback (issue 16 section 2): drafts
verified k + 1 positions per FORWARD, rejected ones rolled back on the next step.
Greedy output is the plain output token for token (a tiny random Llama with every
step audited on duplicate servers, and SmolLM2 with the runtime tests' prompts);
with sampling, the speculative-sampling rule keeps the target's distribution
(checked on the tiny model's real logits with fixed seeds)."""

from __future__ import annotations

import pytest
import torch
import trio
from transformers import LlamaConfig, LlamaForCausalLM

import peer.runtime as rt
from peer._drafters import DraftModel, PromptLookup
from peer.api import Swarm
from peer.speculative import AdaptiveK, Draft, Speculative, accept_drafts

from peer_helpers import start_server

H, LAYERS, VOCAB = 64, 4, 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-spec")
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return str(path)


def _draft_model(source: str, blocks: int) -> DraftModel:
    """A truncated copy of the target: its first ``blocks`` blocks and its head."""
    return DraftModel.from_parts(rt.load_head(source), rt.load_span(source, 0, blocks), name=f"first {blocks}")


PROMPT = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 11, 12, 5, 6, 7]  # repeats: prompt lookup drafts from the start


async def test_greedy_speculation_is_plain_greedy_with_every_step_audited(tiny):
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, tiny, (0, 2))
        for span in ((0, 2), (2, 4), (2, 4)):
            await start_server(nursery, tiny, span, bootstrap=[first.address])
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=tiny, audit=1.0)
        plain = await swarm.client.generate(PROMPT, rt.SamplingParams(max_new_tokens=40))
        # the whole model as its own drafter keeps (nearly) every draft: the bonus path
        for drafter in (PromptLookup(), _draft_model(tiny, 2), _draft_model(tiny, LAYERS)):
            spec = Speculative(drafter, k=4)
            got = await swarm.client.generate(PROMPT, rt.SamplingParams(max_new_tokens=40), speculative=spec)
            assert got.token_ids == plain.token_ids, drafter.name
            assert got.drafted > 0
            assert got.steps < 41
            if drafter.name == f"first {LAYERS}":
                assert got.accepted >= 0.9 * got.drafted
                assert got.steps <= 12
            assert got.audited_steps > 0
            assert got.verified_fraction == 1.0
            print(f"{drafter.name}: {got.accepted}/{got.drafted} drafts kept, {got.steps} steps for 40 tokens")
        await swarm.aclose()
        nursery.cancel_scope.cancel()


class _WrongLast:
    """The whole model as drafter, its last draft of every step made wrong: every step
    keeps k - 1 drafts and rolls one back."""

    def __init__(self, inner: DraftModel) -> None:
        self.inner, self.name = inner, "wrong last"

    def start(self, max_length: int, seed: int) -> None:
        self.inner.start(max_length, seed)

    def draft(self, ids, k, sampler) -> Draft:
        tokens = list(self.inner.draft(ids, k, sampler).tokens)
        if tokens:
            tokens[-1] = (tokens[-1] + 1) % VOCAB
        return Draft(tuple(tokens))


async def test_failover_after_rollbacks_replays_only_the_kept_history(tiny):
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, tiny, (0, 2))
        second = await start_server(nursery, tiny, (0, 2), bootstrap=[first.address])
        await start_server(nursery, tiny, (2, 4), bootstrap=[first.address])
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=tiny, audit=None)
        params = rt.SamplingParams(max_new_tokens=30)
        plain = await swarm.client.generate(PROMPT, params)
        killed = []

        def crash_the_one_in_use(event):
            if event.index >= 12 and not killed:
                victim = first if first.server.open_sessions else second
                victim.cancel_scope.cancel()
                killed.append(victim)

        spec = Speculative(_WrongLast(_draft_model(tiny, LAYERS)), k=3, adaptive=False)
        got = await swarm.client.generate(PROMPT, params, speculative=spec, on_token=crash_the_one_in_use)
        assert killed
        assert got.failovers >= 1
        assert got.accepted < got.drafted  # steps rolled drafts back
        assert got.token_ids == plain.token_ids
        nursery.cancel_scope.cancel()


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells with expected count >= 5 (the rest pooled)."""
    n = float(counts.sum())
    expected = p * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("kind", ["point mass", "draft model"])
def test_speculative_sampling_keeps_the_target_distribution(tiny, kind):
    """The first and second tokens of many seeded generations, drafted and verified by
    ``accept_drafts`` on the tiny model's real logits, against the target's own
    distribution: Pearson's chi-square stays far below the 1e-6 tail at these fixed
    seeds (so it cannot flake), while a drafter's distribution leaking through is
    caught (the biased rule fails the same bound)."""
    head, span = rt.load_head(tiny), rt.load_span(tiny, 0, LAYERS)
    params = rt.SamplingParams(temperature=1.3, top_k=20, seed=0, max_new_tokens=8)
    ids = PROMPT
    sid = span.open_session(64)
    rows = span.forward(sid, head.embed(ids), 0)
    p = torch.softmax(rt.Sampler(params).scores(head.logits(rows[:, -1]), ids), dim=-1)
    drafter = _draft_model(tiny, 1) if kind == "draft model" else PromptLookup()
    trials = 3000
    counts = torch.zeros(VOCAB)
    biased = torch.zeros(VOCAB)
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def target_logits(context: list[int], extra: tuple[int, ...]) -> torch.Tensor:
        key = tuple(context) + extra
        if key not in cache:
            s = span.open_session(64)
            out = span.forward(s, head.embed(list(key)), 0)
            span.close_session(s)
            cache[key] = head.logits_rows(out[:, len(context) - 1:])
        return cache[key]

    for seed in range(trials):
        tokens = rt.TokenStream(head, rt.SamplingParams(temperature=1.3, top_k=20, seed=seed, max_new_tokens=8), ids)
        drafter.start(64, seed)
        draft = drafter.draft(ids, 2, tokens.sampler)
        assert draft.tokens
        accept_drafts(tokens, target_logits(ids, draft.tokens), draft)
        counts[tokens.new_ids[0]] += 1
        # the wrong rule (keep every draft) puts the drafter's distribution through
        biased[draft.tokens[0]] += 1
    stat, dof = _chi2(counts, p)
    bad, _ = _chi2(biased, p)
    bound = dof + 8 * (2 * dof) ** 0.5  # about the 1e-7 tail for these dof
    print(f"{kind}: chi2 {stat:.1f} over {dof} dof (bound {bound:.1f}); keep-every-draft chi2 {bad:.1f}")
    assert stat < bound
    assert bad > bound


def test_adaptive_k_grows_shrinks_and_probes():
    k = AdaptiveK(k=2, k_max=8, probe_every=3)
    k.update(2, 2)
    assert k.next() == 4
    k.update(4, 4)
    k.update(8, 8)
    assert k.next() == 8
    k.update(8, 1)
    assert k.next() == 4
    k.update(4, 1)
    assert k.next() == 2
    k.update(2, 0)
    assert k.k == 0
    assert [k.next() for _ in range(3)] == [0, 0, 1]  # plain steps, then one probe
    k.update(1, 0)  # it failed: the next probe waits twice as long
    assert [k.next() for _ in range(6)] == [0, 0, 0, 0, 0, 1]
    k.update(1, 1)  # it held: drafting again
    assert k.next() == 2
    fixed = AdaptiveK(k=4, adaptive=False)
    fixed.update(4, 0)
    assert fixed.next() == 4


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(max_ngram=3)
    sampler = rt.Sampler(rt.SamplingParams())
    assert lookup.draft([1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 1, 2, 3], 3, sampler) == Draft((4, 5, 1))
    assert lookup.draft([1, 2, 3], 3, sampler) == Draft()
    assert lookup.draft([7, 1, 7], 2, sampler) == Draft((1, 7))


@pytest.mark.slow
async def test_smollm2_greedy_speculation_is_plain_greedy():
    """Two of the runtime tests' SmolLM2 prompts (plain text and a chat), 64 greedy
    tokens each, through two servers: plain, prompt lookup and a draft model (the first
    10 of the model's 30 blocks) give the same tokens. Two, not all five: each prompt
    costs CI about 30 s, and the other three add no path the two do not take."""
    import importlib.util
    from pathlib import Path

    where = Path(__file__).parent / "runtime" / "test_runtime_smollm2.py"
    spec = importlib.util.spec_from_file_location("runtime_smollm2_prompts", where)
    assert spec is not None
    assert spec.loader is not None
    runtime_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime_tests)
    MODEL, NEW_TOKENS, PROMPTS = runtime_tests.MODEL, runtime_tests.NEW_TOKENS, runtime_tests.PROMPTS

    draft = DraftModel.from_parts(rt.load_head(MODEL), rt.load_span(MODEL, 0, 10), name="first 10 blocks")
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, MODEL, (0, 15))
        await start_server(nursery, MODEL, (15, 30), bootstrap=[first.address])
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=MODEL, audit=None)
        params = rt.SamplingParams(max_new_tokens=NEW_TOKENS)
        for prompt in (PROMPTS[1], PROMPTS[4]):
            plain = await swarm.client.generate(prompt, params)
            for drafter in (PromptLookup(), draft):
                got = await swarm.client.generate(prompt, params, speculative=Speculative(drafter, k=4))
                assert got.token_ids == plain.token_ids, (drafter.name, got.text, plain.text)
                print(f"{drafter.name}: {got.accepted}/{got.drafted} kept, {got.steps} steps "
                      f"for {len(got.token_ids)} tokens")
        await swarm.aclose()
        nursery.cancel_scope.cancel()


async def test_speculation_by_push_rolls_every_hop_back_in_one_trip(tiny):
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, tiny, (0, 2))
        await start_server(nursery, tiny, (2, 4), bootstrap=[first.address])
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=tiny, audit=None, relay="push")
        params = rt.SamplingParams(max_new_tokens=24)
        plain = await swarm.client.generate(PROMPT, params)
        spec = Speculative(_WrongLast(_draft_model(tiny, LAYERS)), k=3, adaptive=False)
        got = await swarm.client.generate(PROMPT, params, speculative=spec)
        assert got.token_ids == plain.token_ids
        assert got.accepted < got.drafted  # every step rolled a draft back
        assert got.pushed_steps == got.steps  # ... and went around the chain by push
        await swarm.aclose()
        nursery.cancel_scope.cancel()


async def test_the_api_takes_a_drafter_name_or_a_draft_model_path(tiny):
    with pytest.raises(rt.InvalidArgument, match="share the target's tokenizer"):
        DraftModel(tiny, vocab_size=VOCAB + 1)
    async with trio.open_nursery() as nursery:
        first = await start_server(nursery, tiny, (0, 4))
        swarm = await Swarm.connect(nursery, bootstrap=[first.address], model=tiny, audit=None)
        plain = await swarm.client.generate(PROMPT, rt.SamplingParams(max_new_tokens=16))
        for value in ("prompt-lookup", tiny):  # the path: the model itself as its draft model
            got = await swarm.generate(PROMPT, max_new_tokens=16, speculative=value)  # type: ignore[arg-type]
            assert got.token_ids == plain.token_ids
            assert got.drafted > 0
        assert got.accepted == got.drafted
        await swarm.aclose()
        nursery.cancel_scope.cancel()
