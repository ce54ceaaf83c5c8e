"""Patched variants run from their first patched position on the clean keys and values: exact.

Every architecture the adapters support (tests/tiny_models.py: Gemma-3 with sliding-window
layers of width 4, Gemma-2 with soft-capping, Llama, GPT-2 with learned position embeddings),
prompts of mixed length (right padding), and variants whose first patched position is 0, the
last position, or anything between, several prompts per chunk.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backend.circuits.attribution import Attributor, plan_chunks
from backend.circuits.clean_prefix import first_patched
from backend.circuits.evaluation import Evaluator
from backend.circuits.selection import METHODS, SelectionContext
from tests.pie_fixtures import pie_setup
from tests.tiny_models import ARCHS


def _setups(arch: str):
    s = pie_setup(arch, n_prompts=6)
    # Without the BOS rule position 0 holds occurrences too, so some variants start at p = 0.
    batch = dataclasses.replace(s.batch, has_bos=False)
    assert len(set(batch.last_pos.tolist())) > 1  # mixed lengths: padded rows share chunks
    return s, batch


def _variants(runs, gen: torch.Generator):
    """Singles of random occurrences and of some at position 0 and at the last position, random
    triples within one prompt, and an empty variant per prompt: (variant_prompt [V], variant [m],
    members [m])."""
    occ = runs.occ
    n, B = len(occ), occ.n_prompts
    at_last = occ.pos == runs.batch.last_pos[occ.prompt]
    ends = [torch.nonzero(edge, as_tuple=True)[0][:20] for edge in (occ.pos == 0, at_last)]
    singles = torch.cat([torch.randperm(n, generator=gen)[:150], *ends])
    groups = [(int(occ.prompt[i]), torch.tensor([i])) for i in singles.tolist()]
    for a in torch.randint(0, n, (100,), generator=gen).tolist():
        same = torch.nonzero(occ.prompt == occ.prompt[a], as_tuple=True)[0]
        groups.append((int(occ.prompt[a]), torch.cat([torch.tensor([a]), same[torch.randint(0, len(same), (2,),
                                                                                      generator=gen)]])))
    groups += [(b, torch.empty(0, dtype=torch.long)) for b in range(B)]  # nothing removed: p = last position
    prompts = torch.tensor([b for b, _ in groups])
    variant = torch.cat([torch.full((len(g),), v) for v, (_, g) in enumerate(groups)])
    members = torch.cat([g for _, g in groups])
    return prompts, variant, members


@pytest.mark.parametrize("arch", ARCHS)
def test_removal_metrics_with_and_without_the_prefix_cache_agree(arch):
    s, batch = _setups(arch)
    # Zero corruption: every active feature is an occurrence, from position 0 on (the corrupted
    # IOI prompt equals the clean one before the first name).
    cached = Attributor(s.adapter, s.transcoder, "zero", max_rows=7)
    plain = Attributor(s.adapter, s.transcoder, "zero", max_rows=7, prefix_cache=False)
    runs_c, runs_p = cached.prepare(batch), plain.prepare(batch)
    prompts, variant, members = _variants(runs_c, torch.Generator().manual_seed(0))
    start = first_patched(runs_c.occ, len(prompts), variant, members, batch.last_pos[prompts])
    assert int(start.min()) == 0 and bool((start == batch.last_pos[prompts]).any())
    assert len(torch.unique(start)) > 5
    with_cache = cached.removal_metrics(runs_c, prompts, variant, members)
    without = plain.removal_metrics(runs_p, prompts, variant, members)
    torch.testing.assert_close(with_cache, without, rtol=0, atol=1e-5)
    # The empty variants are the clean run; a removal changes M somewhere.
    B = len(batch)
    torch.testing.assert_close(with_cache[-B:], runs_c.clean_metric, rtol=0, atol=1e-5)
    assert float((with_cache - runs_c.clean_metric[prompts]).abs().max()) > 1e-3
    assert runs_c.counters["patched_forwards"] == runs_p.counters["patched_forwards"] == len(prompts)
    assert runs_c.counters["tokens_forwarded"] < runs_p.counters["tokens_forwarded"]


@pytest.mark.parametrize("arch", ARCHS)
def test_pairs_from_their_earlier_members_single_removal_equal_the_full_forward(arch):
    """A pair {e, l} runs from pos(l) on the keys and values kept from removing e alone: the same
    effects as a full forward, fewer tokens than from pos(e), and retain keeps only what it names."""
    s, batch = _setups(arch)
    gen = torch.Generator().manual_seed(1)
    effects, tokens = {}, {}
    for mode in ("plain", "clean", "singles"):
        attr = Attributor(s.adapter, s.transcoder, "zero", max_rows=5, prefix_cache=mode != "plain")
        runs = attr.prepare(batch)
        occ = runs.occ
        if mode == "plain":
            first = torch.randint(0, len(occ), (120,), generator=gen)
            same = [torch.nonzero(occ.prompt == occ.prompt[i], as_tuple=True)[0] for i in first.tolist()]
            second = torch.stack([ids[torch.randint(0, len(ids), (1,), generator=gen)][0] for ids in same])
            kept_singles = torch.unique(torch.cat([first[::2], second[1::2]]))
        attr.single_effects(runs, kept_singles, keep_prefixes=mode == "singles")
        if mode == "singles":
            store = runs.prefixes
            assert bool((store.source_of[kept_singles] >= batch.clean_ids.shape[0]).all())
        before = runs.counters["tokens_forwarded"]
        effects[mode] = attr.pair_effects(runs, first, second)
        tokens[mode] = runs.counters["tokens_forwarded"] - before
    torch.testing.assert_close(effects["singles"], effects["plain"], rtol=0, atol=1e-5)
    torch.testing.assert_close(effects["clean"], effects["plain"], rtol=0, atol=1e-5)
    assert tokens["singles"] < tokens["clean"] < tokens["plain"]
    # retain: only the named occurrences keep a source, and pairs from them are still exact.
    named = kept_singles[:7]
    store.retain(named)
    assert bool((store.source_of[named] >= 0).all()) and int((store.source_of >= 0).sum()) == len(named)
    torch.testing.assert_close(attr.pair_effects(runs, first, second), effects["plain"], rtol=0, atol=1e-5)
    # A memory cap keeps only what fits; the rest start from the clean prefix, still exact.
    capped = Attributor(s.adapter, s.transcoder, "zero", max_rows=5)
    runs = capped.prepare(batch)
    store = capped._prefixes(runs)
    store.max_bytes = 3 * store.row_bytes()
    capped.single_effects(runs, kept_singles, keep_prefixes=True)
    assert store.n_kept() == 3 and int((store.source_of >= 0).sum()) == 3
    torch.testing.assert_close(capped.pair_effects(runs, first, second), effects["plain"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_fap_synergy_keeps_the_same_sets_with_and_without_the_prefix_cache(arch):
    s = pie_setup(arch, n_prompts=4)
    strategy = METHODS["fap-synergy"]
    kept = {}
    for prefix_cache in (True, False):
        attr = Attributor(s.adapter, s.transcoder, prefix_cache=prefix_cache)
        runs = attr.prepare(s.batch)
        ctx = SelectionContext(runs, attr, Evaluator(attr))
        counts = runs.occ.counts()
        assert int(counts.min()) > 220  # K = 200 has more occurrences than K to rerank
        cases = [(10, {}), (50, {}), (200, {}), (20, {"cap": 4, "bp": 50})]
        for k, opts in cases:
            options = strategy.options(opts)
            kept[(prefix_cache, k)] = strategy.select(ctx, k, options)
        kept[(prefix_cache, "tokens")] = runs.counters["tokens_forwarded"]
    assert strategy.selection_notes(200, strategy.options({}))["capped"]
    assert strategy.selection_notes(20, strategy.options({"cap": 4, "bp": 50}))["capped"]
    assert not strategy.selection_notes(10, strategy.options({}))["capped"]
    for k, _ in cases:
        assert torch.equal(kept[(True, k)], kept[(False, k)]), k
    assert kept[(True, "tokens")] < kept[(False, "tokens")]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["logit_diff", "logit_diff_max"])
def test_metric_from_a_few_logit_columns_equals_the_full_metric(arch, kind):
    """Removal variants unembed only the answer and distractor logits: the same M as from all V."""
    from backend.tasks import metric, metric_columns, metric_from_columns
    s, batch = _setups(arch)
    if kind == "logit_diff_max":  # several distractors, padded with -1 on some rows
        gen = torch.Generator().manual_seed(0)
        extra = torch.randint(0, s.adapter.d_vocab, (len(batch), 2), generator=gen)
        extra[::2, 1] = -1
        batch = dataclasses.replace(batch, metric_kind=kind, distractor_ids=torch.cat([batch.distractor_ids, extra], 1))
    with torch.no_grad():
        full = s.adapter.run(batch.clean_ids, batch.attention_mask, last_pos=batch.last_pos).logits
        cols = s.adapter.run(batch.clean_ids, batch.attention_mask, last_pos=batch.last_pos,
                             columns=metric_columns(batch)).logits
    assert cols.shape == (len(batch), batch.distractor_ids.shape[1] + 1)
    assert torch.allclose(metric_from_columns(cols, batch), metric(full, batch), atol=1e-5, rtol=1e-5)
    assert metric_columns(dataclasses.replace(batch, metric_kind="prob_diff")) is None


def test_plan_chunks_is_the_cheapest_contiguous_cut():
    """The dynamic programme's cut costs exactly the minimum over every contiguous cut into chunks
    of at most max_rows (brute force on small random inputs), and covers every variant once."""
    import itertools
    gen = torch.Generator().manual_seed(3)

    def cost(cuts, length, start, overhead):
        return sum((j - i) * (max(length[i:j]) - min(start[i:j])) + overhead for i, j in zip(cuts[:-1], cuts[1:]))

    for _ in range(40):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        start = sorted(torch.randint(0, 10, (n,), generator=gen).tolist())
        length = [s + int(torch.randint(1, 8, (1,), generator=gen)) for s in start]
        max_rows, overhead = int(torch.randint(1, 5, (1,), generator=gen)), int(torch.randint(0, 12, (1,), generator=gen))
        cuts = plan_chunks(length, start, max_rows, overhead)
        assert cuts[0] == 0 and cuts[-1] == n and all(0 < j - i <= max_rows for i, j in zip(cuts[:-1], cuts[1:]))
        best = min(cost([0, *inner, n], length, start, overhead)
                   for r in range(n) for inner in itertools.combinations(range(1, n), r)
                   if all(0 < j - i <= max_rows for i, j in zip([0, *inner], [*inner, n])))
        assert cost(cuts, length, start, overhead) == best
