"""The PIE engine against ground truth on tiny random models (DESIGN section 5)."""

from __future__ import annotations

import pytest
import torch

from backend.circuits.attribution import Attributor
from backend.circuits.evaluation import Evaluator, kl_divergence
from backend.circuits.occurrences import delta_write_patch
from backend.circuits.pipeline import PruneConfig, SweepConfig, run_prune, run_sweep
from backend.circuits.selection import METHODS, SelectionContext
from backend.errors import InvalidParameterError, NotFoundError, ShapeMismatchError, UserError
from backend.models.transcoder import Transcoder, TranscoderConfig
from backend.tasks import metric
from tests.frozen import FrozenModel
from tests.pie_fixtures import pie_setup

FAST_OPTIONS = {"acdc": {"n_tau": 3}, "factp": {}}


@pytest.fixture(scope="module")
def setup():
    return pie_setup("llama")


def _ctx(setup, corruption="corrupted_prompt", budget="global", seed=0):
    attr = Attributor(setup.adapter, setup.transcoder, corruption)
    runs = attr.prepare(setup.batch)
    return SelectionContext(runs, attr, Evaluator(attr), budget, seed)


@pytest.mark.parametrize("method", list(METHODS))
def test_keeping_every_occurrence_gives_kl_zero(setup, method):
    ctx = _ctx(setup)
    k = int(ctx.occ.counts().max())
    kept = METHODS[method].select(ctx, k, METHODS[method].options(FAST_OPTIONS.get(method)))
    assert bool(kept.all())
    result = ctx.evaluator.evaluate(ctx.runs, [kept], all_token=True, completeness=True)[0]
    assert float(result.kl_last.max()) < 1e-6
    assert float(result.kl_all.max()) < 1e-6
    assert not bool(result.pred_changed.any())
    torch.testing.assert_close(result.faithfulness, torch.ones_like(result.faithfulness))
    # The evaluator skips that forward; the patch it would apply is exactly zero and changes nothing.
    patch = ctx.evaluator.removal_patch(ctx.runs, kept)
    assert not bool(patch.any())
    b = ctx.runs.batch
    with torch.no_grad():
        logits = setup.adapter.run(b.clean_ids, b.attention_mask, last_pos=b.last_pos, patch=patch).logits
    assert float(kl_divergence(ctx.runs.clean_logits, logits).max()) < 1e-6


def test_keeping_none_equals_subtracting_every_delta_write(setup):
    ctx = _ctx(setup)
    adapter, tc, batch = setup.adapter, setup.transcoder, setup.batch
    with torch.no_grad():
        clean = adapter.run(batch.clean_ids, batch.attention_mask, capture=True)
        corr = adapter.run(batch.corrupted_ids, batch.attention_mask, capture=True)
        valid = batch.attention_mask.bool().clone()
        valid[:, 0] = False  # BOS
        delta = (tc.encode(clean.resid_mid) - tc.encode(corr.resid_mid)) * valid[None, :, :, None]
        writes = tc.decode(delta) - tc.b_dec[:, None, None, :]        # sum of every Delta-write
        by_hand = adapter.run(batch.clean_ids, batch.attention_mask, patch=-writes).logits
    none = torch.zeros(len(ctx.occ), dtype=torch.bool)
    result = ctx.evaluator.evaluate(ctx.runs, [none])[0]
    torch.testing.assert_close(result.m_circuit, metric(by_hand, batch), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ctx.evaluator.m_none(ctx.runs), metric(by_hand, batch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "llama", "gpt2"])
def test_fap_equals_exact_patching_when_first_order_is_exact(arch):
    """In the linearised replacement model (patterns, norm scales and MLP outputs frozen) with a
    metric linear in the logits, removing an occurrence changes M by exactly its FAP score."""
    s = pie_setup(arch)
    s.adapter.softcap = None  # Gemma-2's final logit softcap would make the metric nonlinear
    attr = Attributor(s.adapter, s.transcoder)
    runs = attr.prepare(s.batch)
    occ = runs.occ
    frozen = FrozenModel(s.adapter, runs.batch.clean_ids, runs.batch.attention_mask)
    with torch.no_grad():
        base = metric(frozen.run().logits, runs.batch)
        torch.testing.assert_close(base, runs.clean_metric, rtol=1e-4, atol=1e-4)
        ids = torch.randperm(len(occ), generator=torch.Generator().manual_seed(0))[:25]
        for i in ids.tolist():
            one = torch.zeros(len(occ), dtype=torch.bool)
            one[i] = True
            patched = metric(frozen.run(delta_write_patch(s.transcoder, occ, one)).logits, runs.batch)
            b = int(occ.prompt[i])
            exact = float(base[b] - patched[b])
            assert exact == pytest.approx(float(runs.fap[i]), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fap_correlates_with_exact_patching_in_the_real_model(arch):
    s = pie_setup(arch, n_prompts=3)
    ctx = _ctx(s)
    ids = torch.arange(len(ctx.occ))
    exact = ctx.single_effects(ids)
    fap = ctx.runs.fap
    corr = torch.corrcoef(torch.stack([fap, exact]))[0, 1]
    assert corr > 0.9, corr


@pytest.mark.parametrize("method, budget", [(m, b) for m, s in METHODS.items() for b in s.budgets])
def test_every_method_keeps_exactly_k_per_prompt(setup, method, budget):
    strategy = METHODS[method]
    ctx = _ctx(setup, budget=budget)
    counts = ctx.occ.counts()
    options = strategy.options(FAST_OPTIONS.get(method))
    for k in (1, 7, 20, int(counts.max()) + 5):
        kept = strategy.select(ctx, k, options)
        per_prompt = torch.bincount(ctx.occ.prompt[kept], minlength=len(counts))
        assert torch.equal(per_prompt, torch.clamp(counts, max=k)), (method, k)


def test_zero_corruption_occurrences_are_the_clean_active_features(setup):
    ctx = _ctx(setup, corruption="zero")
    assert torch.equal(ctx.occ.delta, ctx.occ.act)
    assert bool((ctx.occ.act > 0).all())


def test_sweep_is_reproducible_and_independent_of_batch_size(setup):
    config = dict(methods=["fap", "fap-synergy", "random", "activation-magnitude"], ks=[3, 10],
                  random_seeds=2, options={"fap-synergy": {"bp": 50}})
    kw = dict(model_name="tiny", transcoder_name="tiny-clt", task_name="ioi")
    a = run_sweep(setup.adapter, setup.transcoder, setup.batch, SweepConfig(batch_size=2, **config), **kw)
    b = run_sweep(setup.adapter, setup.transcoder, setup.batch, SweepConfig(batch_size=3, **config), **kw)
    c = run_sweep(setup.adapter, setup.transcoder, setup.batch, SweepConfig(batch_size=2, **config), **kw)
    for method in config["methods"]:
        for k in ("3", "10"):
            assert a.per_prompt_kl[method][k] == c.per_prompt_kl[method][k]
            assert a.per_prompt_kl[method][k] == pytest.approx(b.per_prompt_kl[method][k], rel=1e-4, abs=1e-6)
    assert [r.k for r in a.random_curve] == [r.k for r in b.random_curve]
    row = a.to_json()["rows"][0]
    for key in ("method", "k", "kl_mean", "kl_std", "kl_ci95", "pred_change_rate", "faithfulness_mean",
                "n_prompts", "seconds"):
        assert key in row
    assert set(a.effective_compression) == set(config["methods"])
    # More budget never hurts much on average: the last random-curve point keeps everything.
    assert a.random_curve[-1].kl_mean < 1e-6


def test_prune_writes_kept_occurrences_and_aggregated_features(setup):
    circuit = run_prune(setup.adapter, setup.transcoder, setup.batch, PruneConfig(method="fap", k=5),
                        model_name="tiny", transcoder_name="tiny-clt", task_name="ioi")
    assert len(circuit.prompts) == len(setup.batch)
    for p in circuit.prompts:
        assert len(p.kept) == min(5, p.n_active)
        scores = [abs(o.score) for o in p.kept]
        assert scores == sorted(scores, reverse=True)
        assert p.completeness is not None and p.kl_all is not None
    total = sum(f.n_prompts for f in circuit.features)
    assert total == len({(p.index, o.layer, o.feature) for p in circuit.prompts for o in p.kept})
    again = type(circuit).from_json(circuit.to_json())
    assert again == circuit


def test_fap_beats_random_on_average(setup):
    result = run_sweep(setup.adapter, setup.transcoder, setup.batch,
                       SweepConfig(methods=["fap", "random"], ks=[5, 10], random_seeds=3, random_curve=False),
                       model_name="tiny", transcoder_name="tiny-clt", task_name="ioi")
    by = {(r.method, r.k): r.kl_mean for r in result.rows}
    assert by[("fap", 5)] < by[("random", 5)] and by[("fap", 10)] < by[("random", 10)]


@pytest.mark.parametrize("change, error, needle", [
    (dict(k=0), InvalidParameterError, "K must be"),
    (dict(k=-3), InvalidParameterError, "K must be"),
    (dict(method="nope"), NotFoundError, "unknown method 'nope'"),
    (dict(method="fap-synergy", budget="per_layer"), InvalidParameterError, "supports budget"),
    (dict(options={"bogus": 1}), InvalidParameterError, "no option"),
    (dict(corruption="sideways"), InvalidParameterError, "unknown corruption"),
])
def test_bad_prune_parameters_are_clear_errors(setup, change, error, needle):
    config = PruneConfig(**{**dict(method="fap", k=5), **change})
    with pytest.raises(error, match=needle):
        run_prune(setup.adapter, setup.transcoder, setup.batch, config,
                  model_name="tiny", transcoder_name="tiny-clt", task_name="ioi")


def test_a_transcoder_that_does_not_fit_is_a_clear_error(setup):
    wrong = Transcoder.random(TranscoderConfig("clt", 3, 16, 8, "relu"))
    with pytest.raises(ShapeMismatchError, match="16.*32|32.*16"):
        run_prune(setup.adapter, wrong, setup.batch, PruneConfig(method="fap", k=5),
                  model_name="tiny", transcoder_name="wrong", task_name="ioi")


def test_a_task_with_no_usable_prompts_is_a_clear_error(setup, tmp_path):
    from backend.tasks import get_task
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"text_clean": "Mary and John", "text_corr": "Mary and John went", '
                    '"io_clean": "Mary", "s_clean": "John"}\n')
    with pytest.raises(UserError, match="dropped"):
        get_task("jsonl", path=str(path)).build(setup.adapter.tokenizer, 1)


def test_synergy_rewards_a_pair_that_acts_together(setup):
    """Find, by exact pair patching, a boundary occurrence c whose removal together with the top
    occurrence b costs more than the two removals apart (Syn(b, c) > 0, both singles > 0). With b
    as the only partner and the budget K = rank(c), FAP (top-K by |S|) drops c; FAP-Synergy's
    synergy term must bring it back, and its synergy must equal the effects' arithmetic."""
    ctx = _ctx(setup)
    occ, score = ctx.occ, ctx.runs.fap.abs()
    found = None
    for prompt in range(occ.n_prompts):
        ids = torch.nonzero(occ.prompt == prompt, as_tuple=True)[0]
        order = ids[torch.argsort(score[ids], descending=True, stable=True)]
        b, rest = order[0], order[3:30]
        singles = ctx.single_effects(torch.cat([b[None], rest]))
        pairs = ctx.attributor.pair_effects(ctx.runs, b.repeat(len(rest)), rest)
        syn = pairs - singles[0] - singles[1:]
        counted = (singles[0] > 0) & (singles[1:] > 0) & (syn > 0)
        if counted.any():
            best = int(torch.argmax(torch.where(counted, syn, torch.tensor(float("-inf")))))
            found = prompt, b, rest, singles, best
            break
    assert found is not None, "no positively synergistic pair in the tiny model"
    prompt, b, rest, singles, best = found
    c, k = rest[best], 3 + best
    fap_kept = METHODS["fap"].select(ctx, k, {})
    assert not bool(fap_kept[c])
    options = METHODS["fap-synergy"].options({"lam": 1e6, "bp": 100, "partners": 1, "samples": 1})
    syn_kept = METHODS["fap-synergy"].select(ctx, k, options)
    assert bool(syn_kept[c]) and bool(syn_kept[b])
    assert int(syn_kept[occ.prompt == prompt].sum()) == k
    # The cached effects are the same exact numbers the test computed.
    cache = ctx.cache["single"]
    torch.testing.assert_close(cache[c], singles[1 + best])


def test_exact_effects_agree_with_the_evaluator(setup):
    """Single and pair effects (sparse per-variant patches, chunks cut to each prompt's length)
    equal M(clean) - M(circuit) from the evaluator's dense removal patches."""
    ctx = _ctx(setup)
    occ = ctx.occ
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(len(occ), generator=g)[:6]
    singles = ctx.single_effects(ids)
    others = torch.stack([torch.nonzero(occ.prompt == occ.prompt[i], as_tuple=True)[0][0] for i in ids])
    pairs = ctx.attributor.pair_effects(ctx.runs, ids, others)
    for i, o, s1, s2 in zip(ids.tolist(), others.tolist(), singles.tolist(), pairs.tolist()):
        b = int(occ.prompt[i])
        for removed, effect in (([i], s1), ([i, o], s2)):
            kept = torch.ones(len(occ), dtype=torch.bool)
            kept[removed] = False
            m = ctx.evaluator.evaluate(ctx.runs, [kept])[0].m_circuit[b]
            assert effect == pytest.approx(float(ctx.runs.clean_metric[b] - m), rel=1e-4, abs=1e-5)


def test_sweep_without_the_random_curve_still_counts_active_occurrences(setup):
    result = run_sweep(setup.adapter, setup.transcoder, setup.batch,
                       SweepConfig(methods=["fap"], ks=[3], random_curve=False, all_token_kl=True),
                       model_name="tiny", transcoder_name="tiny-clt", task_name="ioi")
    counts = _ctx(setup).occ.counts().float()
    assert result.n_active_mean == pytest.approx(float(counts.mean()))
    assert result.rows[0].kl_all_mean is not None


@pytest.fixture(scope="module")
def wide_setup():
    """~3,000 occurrences per prompt: room for K = 400, 800, 1600 below the active count."""
    return pie_setup("llama", n_prompts=3, n_features=128)


@pytest.mark.parametrize("k", [100, 200, 400, 800, 1600])
def test_synergy_keeps_exactly_k_where_the_boundary_exceeds_the_cap(wide_setup, k):
    """At the paper's defaults (bp 25, cap 32) h = round(K/8) > cap from K = 264 on: the capped
    window is the cap ranks centred on K, the slots it leaves go by FAP rank."""
    strategy = METHODS["fap-synergy"]
    options = strategy.options(None)
    h, s, c = strategy.boundary(k, options)
    ctx = _ctx(wide_setup)
    counts = ctx.occ.counts()
    assert bool((counts > k + c).all())
    kept = strategy.select(ctx, k, options)
    assert torch.equal(torch.bincount(ctx.occ.prompt[kept], minlength=len(counts)), torch.full_like(counts, k))
    if k >= 400:
        assert h > options["cap"] and s == 16 and c == 32
    # The rule: FAP's top K-s are all kept, the other s come from ranks [K-s, K-s+c) only.
    from backend.circuits.selection.base import segment_rank
    rank = segment_rank(ctx.runs.fap.abs(), ctx.occ.prompt)
    assert bool(kept[rank < k - s].all())
    assert not bool(kept[rank >= k - s + c].any())
    notes = strategy.selection_notes(k, options)
    assert notes["candidate_ranks"] == [k - s, k - s + c] and notes["fap_rank_slots"] == h - s


KW = dict(model_name="tiny", transcoder_name="tiny-clt", task_name="ioi")


def test_effective_budget_runs_the_base_method_at_k_prime_and_at_1_5_k(setup):
    """The base method (FAP) really runs at round(K') and round(1.5 K): its per-prompt KL there
    equals a direct FAP prune at that K, and the TOST is the paired test of those numbers."""
    from backend.circuits.stats import paired_tost
    config = SweepConfig(methods=["fap", "fap-signal"], ks=[2, 50, 200], batch_size=4, random_curve=False,
                         options={"fap-signal": {"gamma": 0.5}}, tost_margin=1e-5)
    result = run_sweep(setup.adapter, setup.transcoder, setup.batch, config, **KW)
    rows = {e["k"]: e for e in result.effective_budget}
    assert set(rows) == {2, 50, 200} and all(e["method"] == "fap-signal" and e["base"] == "fap" for e in rows.values())
    off_grid = {e["k_base"] for e in rows.values()} - {2, 50, 200}
    assert off_grid, "no K' off the grid: the test would not exercise the second pass"
    assert rows[50]["k_claimed"] == 75 and rows[200]["k_claimed"] == 300
    assert {r.k for r in result.budget_runs} == off_grid | {3, 75, 300}
    for e in rows.values():
        for k_run, mean_key in ((e["k_base"], "base_kl_at_k_base"), (e["k_claimed"], "base_kl_at_k_claimed")):
            direct = run_prune(setup.adapter, setup.transcoder, setup.batch,
                               PruneConfig(method="fap", k=k_run, completeness=False, all_token_kl=False), **KW)
            direct_kl = [p.kl_last for p in direct.prompts]
            ran = result.budget_runs_kl.get(str(k_run)) or result.per_prompt_kl["fap"][str(k_run)]
            assert ran == pytest.approx(direct_kl, rel=1e-5, abs=1e-9)
            assert e[mean_key] == pytest.approx(direct.kl.mean, rel=1e-5, abs=1e-9)
        a = result.per_prompt_kl["fap-signal"][str(e["k"])]
        base_at = result.budget_runs_kl.get(str(e["k_base"])) or result.per_prompt_kl["fap"][str(e["k_base"])]
        tost = paired_tost(a, base_at, 1e-5)
        assert (e["p_lower"], e["p_upper"], e["p_value"]) == (tost["p_lower"], tost["p_upper"], tost["p_value"])
        assert e["margin"] == 1e-5
    k_prime_row = next(e for e in rows.values() if e["k_base"] in off_grid)
    fap_rows = sorted((r for r in result.rows if r.method == "fap"), key=lambda r: r.k)
    from backend.circuits.stats import effective_budget
    assert k_prime_row["k_equivalent"] == effective_budget(k_prime_row["kl_mean"], [r.k for r in fap_rows],
                                                           [r.kl_mean for r in fap_rows])


def test_a_bad_tost_margin_is_a_clear_error(setup):
    with pytest.raises(InvalidParameterError, match="TOST margin"):
        run_sweep(setup.adapter, setup.transcoder, setup.batch,
                  SweepConfig(methods=["fap"], ks=[3], tost_margin=0.0), **KW)


def test_sweep_equals_a_direct_evaluation_of_every_point(setup):
    """Every number of a batched two-pass sweep (rows, completeness, random curve) is what one
    evaluation of all prompts at once gives for that method and K."""
    from backend.circuits.pipeline import random_grid
    methods, ks = ["fap", "random", "activation-magnitude"], [3, 10]
    result = run_sweep(setup.adapter, setup.transcoder, setup.batch,
                       SweepConfig(methods=methods, ks=ks, random_seeds=2, batch_size=4), **KW)
    ctx = _ctx(setup)
    seeds = {"random": [0, 1]}

    def direct(name, k, completeness):
        masks = [METHODS[name].select(ctx, k, METHODS[name].options({"seed": s} if s is not None else None))
                 for s in seeds.get(name, [None])]
        res = ctx.evaluator.evaluate(ctx.runs, masks, completeness=completeness)
        kl = torch.stack([r.kl_last for r in res]).mean(0)
        comp = torch.stack([r.completeness for r in res]).nanmean(0) if completeness else None
        return kl, comp

    for row in result.rows:
        kl, comp = direct(row.method, row.k, True)
        assert result.per_prompt_kl[row.method][str(row.k)] == pytest.approx(kl.tolist(), rel=1e-5, abs=1e-9)
        assert row.completeness_mean == pytest.approx(float(comp.nanmean()), rel=1e-5, abs=1e-9)
    grid = random_grid(ks, int(ctx.occ.counts().max()))
    assert [r.k for r in result.random_curve] == grid
    for row in result.random_curve:
        kl, _ = direct("random", row.k, False)
        assert row.kl_mean == pytest.approx(float(kl.mean()), rel=1e-5, abs=1e-9)


def test_a_sweep_holds_one_batch_of_runs_at_a_time(setup, monkeypatch):
    """Memory independent of N: when a batch is prepared, no earlier batch's runs (with their
    dense [L, B, T, d] sum of Delta-writes) are still alive."""
    import gc
    import weakref
    alive: list[weakref.ref] = []
    prepare = Attributor.prepare

    def tracked(self, batch, offset=0):
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier batch's runs are still referenced"
        runs = prepare(self, batch, offset)
        alive.append(weakref.ref(runs))
        return runs

    monkeypatch.setattr(Attributor, "prepare", tracked)
    run_sweep(setup.adapter, setup.transcoder, setup.batch,
              SweepConfig(methods=["fap", "fap-signal"], ks=[2, 50], batch_size=2, random_curve=False,
                          options={"fap-signal": {"gamma": 0.5}}), **KW)
    assert len(alive) == 2 * 3  # two passes over three batches (the second for FAP at round(K'))


def test_synergy_below_float_resolution_counts_as_none():
    from backend.circuits.selection.synergy import RESOLUTION, synergy
    first, second = torch.tensor([1.0, 1.0, 0.5]), torch.tensor([2.0, 2.0, 0.25])
    pair = torch.tensor([3.0 + 1e-7, 3.5, 0.75 - 0.1])  # noise, a real synergy, a real antagonism
    assert synergy(pair, first, second).tolist() == pytest.approx([0.0, 0.5, -0.1])
    assert RESOLUTION * 6 > 1e-7 * 3  # the noise of a float32 difference is well below the floor


def test_synergy_kept_sets_do_not_depend_on_float_noise_in_the_effects(setup):
    """Occurrences that do not interact (every pair effect is the sum of its singles) with nearly
    equal |S|: effects carrying float32-sized relative noise, as another chunking or the prefix
    cache gives, must leave the kept sets as they are (the synergy is 0, not the noise)."""
    class Additive(type(_ctx(setup).attributor)):
        def __init__(self, base, seed):
            self.__dict__.update(base.__dict__)
            self.gen = torch.Generator().manual_seed(seed)

        def _jitter(self, values):
            return values * (1 + 3e-7 * (2 * torch.rand(values.shape, generator=self.gen) - 1))

        def single_effects(self, runs, members, keep_prefixes=False):
            return self._jitter(torch.ones(len(members)))

        def pair_effects(self, runs, first, second):
            return self._jitter(torch.full((len(first),), 2.0))

    method = METHODS["fap-synergy"]
    options = method.options({"bp": 100})
    kept = []
    for seed in range(4):
        ctx = _ctx(setup)
        n = len(ctx.occ)
        ctx.runs.fap = 1.0 + 1e-7 * torch.randperm(n, generator=torch.Generator().manual_seed(0)).float()
        ctx.attributor = Additive(ctx.attributor, seed)
        kept.append([method.select(ctx, k, options) for k in (6, 12)])
    fap = [METHODS["fap"].select(ctx, k, {}) for k in (6, 12)]
    for other in kept:
        assert all(torch.equal(a, b) for a, b in zip(other, fap))  # no synergy: FAP's own order
