"""Interpretation building blocks on hand-made fixtures and a tiny model: FADE metrics against
scikit-learn, the batched harvest against a direct encode, the offline explainer and rater,
and steering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from backend.interp import fade
from backend.interp.explainers import (FeatureInput, OfflineExplainer, explanation_prompt, mark_example,
                                       parse_explanation)
from backend.interp.harvest import (SPLITS, HarvestConfig, corpus_windows, encode_features, harvest, histograms,
                                    sparse_activations, split_of, window_activations)
from backend.interp.llm import MalformedReply
from backend.interp.raters import OfflineRater, is_proxy, key_tokens, parse_ratings
from backend.interp.steering import steered_continuations
from backend.models.corpus import story_documents
from tests.pie_fixtures import pie_setup

# ------------------------------------------------------------------------------ FADE metrics

# Hand-made fixtures: activations with ties, negative (signed) values, ratings 0/1/2.
ACTS = np.array([3.0, 2.5, 2.5, -4.0, 0.0, 0.0, 1.0, 2.5, 0.5, 0.0, 3.0, -1.0])
RATINGS = np.array([2, 2, 0, 1, 0, 0, 1, 2, 0, 0, 2, 0])


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_average_precision_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    y[:2] = [0, 1]
    scores = rng.integers(-3, 4, 40).astype(float)  # few distinct values: many ties
    assert fade.roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert fade.average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)


def test_one_class_labels_leave_the_metric_undefined():
    assert fade.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert fade.average_precision([0, 0], [0.1, 0.2]) is None
    assert fade.responsiveness([1.0, 2.0], [1, 2]) is None


def test_text_activation_is_the_signed_value_of_largest_magnitude():
    acts = np.array([[0.5, -3.0, 2.0], [1.0, 0.0, 9.0], [0.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    assert fade.text_activation(acts, mask).tolist() == [-3.0, 1.0, 0.0]


def test_clarity_matches_sklearn():
    concept, natural = ACTS[:5], ACTS[5:]
    labels = np.r_[np.ones(5), np.zeros(7)]
    expected = abs(2 * roc_auc_score(labels, ACTS) - 1)
    assert fade.clarity(concept, natural) == pytest.approx(expected)


def test_responsiveness_drops_vague_ratings_and_matches_sklearn():
    keep = RATINGS != 1
    expected = abs(2 * roc_auc_score(RATINGS[keep] == 2, ACTS[keep]) - 1)
    assert fade.responsiveness(ACTS, RATINGS) == pytest.approx(expected)
    # Changing the activation of a text rated 1 changes nothing.
    moved = ACTS.copy()
    moved[RATINGS == 1] = 100.0
    assert fade.responsiveness(moved, RATINGS) == pytest.approx(expected)


def test_purity_matches_sklearn():
    assert fade.purity(ACTS, RATINGS) == pytest.approx(average_precision_score(RATINGS == 2, ACTS))


def test_faithfulness_normalises_against_the_unsteered_baseline():
    ratings = {-50.0: [0, 0], 0.0: [0, 1], 10.0: [1, 1], 50.0: [2, 2]}
    base, best = 0.25, 1.0
    assert fade.faithfulness(ratings) == pytest.approx((best - base) / (1 - base))
    assert fade.faithfulness({0.0: [2, 2], 5.0: [0, 0]}) == 0.0
    assert fade.faithfulness({0.0: [1], 5.0: [0]}) == 0.0
    assert fade.faithfulness({5.0: [2]}) is None


# ------------------------------------------------------------------------------ harvest

@pytest.fixture(scope="module")
def setup():
    return pie_setup(n_features=24, seed=1)


@pytest.fixture(scope="module")
def docs():
    return story_documents(6000, seed=3)


FEATURES = [(2, 5), (0, 3), (1, 7), (0, 11), (2, 0)]


def test_encode_features_equals_a_full_encode(setup):
    adapter, tc = setup.adapter, setup.transcoder
    ids = setup.batch.clean_ids
    run = adapter.run(ids, setup.batch.attention_mask, capture=True)
    got = encode_features(tc, run.resid_mid, FEATURES)
    full = tc.encode(run.resid_mid)                                    # [L, B, T, F]
    want = torch.stack([full[l, :, :, f] for l, f in FEATURES], dim=-1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_encode_features_other_activations(activation):
    s = pie_setup(n_features=24, activation=activation, seed=2)
    run = s.adapter.run(s.batch.clean_ids, s.batch.attention_mask, capture=True)
    full = s.transcoder.encode(run.resid_mid)
    want = torch.stack([full[l, :, :, f] for l, f in FEATURES], dim=-1)
    torch.testing.assert_close(encode_features(s.transcoder, run.resid_mid, FEATURES), want)


def test_window_activations_do_not_depend_on_batch_size(setup, docs):
    windows = corpus_windows(setup.adapter.tokenizer, docs, 400, 24)
    a = window_activations(setup.adapter, setup.transcoder, windows, FEATURES, batch_size=2)
    b = window_activations(setup.adapter, setup.transcoder, windows, FEATURES, batch_size=64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a[:, 0] == 0).all() and (a[windows.mask == 0] == 0).all()   # BOS and padding excluded


def test_histograms_count_every_nonzero_activation():
    # Nonzero entries of two features (and a third that never fires).
    feature = torch.tensor([0, 0, 0, 1, 1])
    value = torch.tensor([1.0, 2.0, 4.0, 3.0, 1.0])
    edges, counts, n_active, hi = histograms(feature, value, n=3, n_bins=4)
    assert n_active.tolist() == [3, 2, 0] and hi.tolist() == [4.0, 3.0, 0.0]
    assert counts.sum(1).tolist() == [3, 2, 0]
    assert edges[0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and edges[2].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert counts[0].tolist() == [0, 1, 1, 1]   # 1.0 -> bin 1, 2.0 -> bin 2, 4.0 -> the last bin


def test_sparse_activations_hold_exactly_the_nonzero_entries(setup, docs):
    windows = corpus_windows(setup.adapter.tokenizer, docs, 300, 24)
    dense = window_activations(setup.adapter, setup.transcoder, windows, FEATURES)
    sparse = sparse_activations(setup.adapter, setup.transcoder, windows, FEATURES, batch_size=3)
    assert sparse.key.numel() == int((dense != 0).sum())
    T = dense.shape[1]
    for j in range(len(FEATURES)):
        for w in (0, dense.shape[0] - 1):
            torch.testing.assert_close(sparse.row(j, w, 0, T), dense[w, :, j])
    torch.testing.assert_close(sparse.seq_max, dense.max(1).values)


def test_harvest_statistics_and_examples(setup, docs):
    config = HarvestConfig(n_tokens=500, seq_len=24, batch_size=4, n_top=3, n_quantiles=2, per_quantile=2)
    results = harvest(setup.adapter, setup.transcoder, docs, FEATURES, config, corpus_name="stories")
    windows = corpus_windows(setup.adapter.tokenizer, docs, 500, 24)
    acts = window_activations(setup.adapter, setup.transcoder, windows, FEATURES)
    valid = windows.valid
    for j, r in enumerate(results):
        assert (r.layer, r.feature) == FEATURES[j]
        col = acts[..., j][valid]
        s = r.statistics
        assert s["n_tokens"] == int(valid.sum())
        assert s["density"] == pytest.approx(float((col > 0).float().mean()))
        assert s["max_activation"] == pytest.approx(float(col.max()))
        assert sum(s["histogram"]["counts"]) == int((col > 0).sum())
        assert s["split"]["explain_windows"] + s["split"]["holdout_windows"] == windows.ids.shape[0]
        splits = [e["split"] for e in r.examples]
        assert splits == sorted(splits)                                 # explain first, then holdout
        for name in SPLITS:  # each split sampled on its own: top examples, then quantiles, high to low
            mine = [e for e in r.examples if e["split"] == name]
            quantiles = [e["quantile"] for e in mine]
            assert quantiles == sorted(quantiles) and quantiles.count(0) <= 3
            maxima = [e["max_activation"] for e in mine]
            assert maxima == sorted(maxima, reverse=True)
            in_split = torch.tensor([split_of(d) == name for d in windows.doc])
            best = acts[in_split][..., j][valid[in_split]].max() if in_split.any() else torch.tensor(0.0)
            if mine:
                assert mine[0]["max_activation"] == pytest.approx(float(best))
        if r.examples:
            assert max(e["max_activation"] for e in r.examples) == pytest.approx(s["max_activation"])
        for e in r.examples:  # each window's activations are the dense ones around its max
            fields = dict(part.split("=") for part in e["source"].split(";"))
            w, p = int(fields["window"]), int(fields["pos"])
            assert split_of(int(fields["doc"])) == e["split"] and windows.doc[w] == int(fields["doc"])
            lo = max(1, p - config.before)
            want = acts[w, lo:lo + len(e["activations"]), j]
            assert e["activations"] == pytest.approx(want.tolist(), abs=1e-4)
            assert max(e["activations"]) == pytest.approx(e["max_activation"], abs=1e-4)


def test_logit_lens_uses_the_summed_decoder_rows(setup, docs):
    config = HarvestConfig(n_tokens=100, seq_len=24, n_logits=3)
    [r] = harvest(setup.adapter, setup.transcoder, docs, [(0, 3)], config)
    row = setup.transcoder.decoder_rows(0, torch.tensor([3]))[0].sum(0)
    logits = setup.adapter.unembedding @ row
    assert [v for _, v in r.statistics["logit_lens"]["top"]] == pytest.approx(logits.topk(3).values.tolist(), abs=1e-3)
    top_tokens = [setup.adapter.tokenizer.decode([i]) for i in logits.topk(3).indices.tolist()]
    assert [t for t, _ in r.statistics["logit_lens"]["top"]] == top_tokens


# ------------------------------------------------------------------------------ explainers, raters

def feature_input() -> FeatureInput:
    stats = {"max_activation": 4.0, "logit_lens": {"top": [[" gave", 2.0], [" to", 1.0]], "bottom": []}}
    examples = [
        {"tokens": ["Mary", " gave", " John", " a", " ring"], "activations": [0.0, 0.5, 4.0, 0.1, 0.0], "quantile": 0},
        {"tokens": ["Then", " John", " left"], "activations": [0.0, 3.0, 0.0], "quantile": 0},
        {"tokens": ["Anna", " saw", " Tom"], "activations": [0.0, 0.0, 2.5], "quantile": 0},
        {"tokens": ["x", " y"], "activations": [0.0, 0.3], "quantile": 1},
    ]
    return FeatureInput(1, 2, stats, examples)


def test_prompt_marks_tokens_above_the_fraction_of_the_max():
    assert mark_example(feature_input().examples[0], 2.0) == "Mary gave<< John>> a ring"
    messages = explanation_prompt(feature_input(), fraction=0.5)
    assert "Example 3: Anna saw<< Tom>>" in messages[1]["content"] and "[EXPLANATION]:" in messages[0]["content"]


def test_parse_explanation():
    assert parse_explanation("thinking...\n[EXPLANATION]: names of people\n") == "names of people"
    with pytest.raises(MalformedReply):
        parse_explanation("The feature detects names.")


def test_offline_explainer_is_deterministic_and_names_its_heuristic():
    a, b = OfflineExplainer().explain(feature_input()), OfflineExplainer().explain(feature_input())
    assert a == b
    assert a.startswith('Fires on "John", "Tom"') and "promotes gave / to" in a and "heuristic" in a
    assert key_tokens(a) == ["john", "tom"]


def test_offline_rater_is_a_token_proxy():
    rater = OfflineRater(per_call=2)
    assert rater.rate('Fires on "John"', ["John left.", "Johnny left.", "Mary left."]) == [2, 1, 0]
    assert rater.calls == 2 and rater.tokens == 0 and rater.name == "offline-proxy"
    assert is_proxy(rater.name) and not is_proxy("llm:gpt-4o") and not is_proxy("human")
    texts = rater.generate('Fires on "John", "Tom"', 4)
    assert len(texts) == 4 and all(rater.rate('Fires on "John", "Tom"', [t]) == [2] for t in texts)


def test_parse_ratings():
    assert parse_ratings("1: 2\n2: 0\n3: 1", 3) == [2, 0, 1]
    with pytest.raises(MalformedReply):
        parse_ratings("1: 2\nthe rest are zero", 3)


# ------------------------------------------------------------------------------ steering

@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2", "gpt2"])
def test_steering_with_the_cache_equals_rerunning_every_step(arch):
    """Cached generation (prompt once, then one token a step) gives the tokens that rerunning the
    whole sequence with the steer at every step gives; factor 0 is plain greedy decoding."""
    s = pie_setup(arch)
    adapter, tc = s.adapter, s.transcoder
    features, max_acts, factors, n_new = [(0, 3), (1, 7)], [1.0, 2.0], (0.0, 30.0, 500.0), 6  # > sliding window
    prompts = s.batch.clean_ids[:2, :5]
    out = steered_continuations(adapter, tc, features, max_acts, prompts, factors=factors, n_new=n_new, max_rows=5)
    assert out.shape == (2, 3, 2, n_new)
    for j, (layer, index) in enumerate(features):
        rows = tc.decoder_rows(layer, torch.tensor([index]))[0]                           # [L - layer, d]
        for i, factor in enumerate(factors):
            seq = prompts.clone()
            for _ in range(n_new):
                T = seq.shape[1]
                patch = torch.zeros(adapter.n_layers, seq.shape[0], T, adapter.d_model)
                patch[layer:, :, 4:] = factor * max_acts[j] * rows[:, None, None, :]         # from the last prompt token
                seq = torch.cat([seq, adapter.run(seq, patch=patch).logits.argmax(-1, keepdim=True)], dim=1)
            assert torch.equal(out[j, i], seq[:, 5:]), (arch, j, factor)
    assert torch.equal(out[0, 0], out[1, 0])
    # A factor-500 write into every target layer must move the model somewhere.
    assert not torch.equal(out[:, 2], out[:, 0])
