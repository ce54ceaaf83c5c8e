"""Explain and score the features of one circuit (PIE's Interpret and Evaluate steps).

`explain_circuit`: harvest the circuit's features that lack statistics for this corpus and
budget (one batched pass), then explain them `chunk` features at a time, storing each chunk as
it is done. Features that already hold an explanation by the same explainer and model are not
explained again (features shared by circuits are explained once) unless `force`.
An explainer sees only the feature's "explain" examples (`explainer_input`), the logit lens and
the largest activation among those examples: nothing of the held-out split.

`score_circuit`: FADE metrics (`backend.interp.fade`) of each feature's latest explanation, on
texts the explainer never saw (`backend.interp.harvest`, the split):
- natural texts = the feature's "holdout" examples (sampled across activation quantiles) plus
  `n_natural` random windows of held-out corpus documents (shared by all features; activations
  computed in one pass);
- clarity: `n_generated` texts the rater writes to express the concept vs the random windows;
- responsiveness, purity: the rater's ratings of the natural texts;
- faithfulness: greedy continuations of `n_steer_prompts` held-out windows under steering
  (`backend.interp.steering`), rated;
- with human ratings of held-out examples (annotations) present, responsiveness and purity are
  also computed from them (rater "human"). Ratings of "explain" examples are not used.
A feature must be scored on the corpus it was harvested on (else the split is unknown).

Both return a report with the calls and tokens spent, which the job stores on the circuit.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from backend.interp import fade
from backend.interp.explainers import ExplainResult, FeatureInput
from backend.interp.harvest import (EXPLAIN, HOLDOUT, FeatureKey, HarvestConfig, TokenWindows, corpus_windows,
                                    harvest, pad_windows, split_documents, window_activations)
from backend.interp.raters import Rater
from backend.interp.steering import FACTORS, steered_continuations
from backend.interp.records import FeatureState, FeatureStore
from backend.models.adapters import ModelAdapter
from backend.models.transcoder import Transcoder

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]

# Faithfulness defaults: each factor's mean rating rests on N_STEER_PROMPTS x N_NEW_TOKENS tokens
# of continuation (it was 2 x 8, too few for the max over factors to mean much).
N_STEER_PROMPTS = 8
N_NEW_TOKENS = 16


def _quiet(fraction: float, message: str) -> None:
    return None


@dataclass
class ExplainReport:
    """What an explain run did: features harvested / explained / skipped, errors, and cost."""

    harvested: int = 0
    explained: int = 0
    reused: int = 0
    errors: dict[str, str] = field(default_factory=dict)   # "layer/feature" -> message
    calls: int = 0
    tokens: int = 0


@dataclass
class ScoreConfig:
    """How many texts each FADE metric rests on (the defaults are measured in the README)."""

    n_natural: int = 20
    n_generated: int = 10
    faithfulness: bool = True
    factors: tuple[float, ...] = FACTORS
    n_steer_prompts: int = N_STEER_PROMPTS
    steer_prompt_len: int = 8
    n_new_tokens: int = N_NEW_TOKENS
    seed: int = 0


@dataclass
class ScoreReport:
    """What a score run did; `texts` records where its rated texts came from (corpus documents)."""

    scored: int = 0
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)  # "layer/feature" -> metric -> value
    errors: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    tokens: int = 0
    texts: dict[str, list[int]] = field(default_factory=dict)   # "natural_docs", "steer_docs"


def feature_name(key: FeatureKey) -> str:
    return f"{key[0]}/{key[1]}"


def needs_harvest(state: FeatureState, corpus: str, n_tokens_budget: int) -> bool:
    """No statistics for this corpus and budget, no examples, or examples from before the split."""
    stats = state.statistics or {}
    return not stats or stats.get("corpus") != corpus or stats.get("n_tokens_budget") != n_tokens_budget \
        or not state.examples or "split" not in stats or any(e.get("split") is None for e in state.examples)


def explainer_input(key: FeatureKey, state: FeatureState) -> FeatureInput:
    """What an explainer may see of a feature: its "explain" examples, the logit lens, and the
    largest activation among those examples (so no held-out text or number reaches it)."""
    examples = [e for e in state.examples if e.get("split") == EXPLAIN]
    stats = {"logit_lens": (state.statistics or {}).get("logit_lens", {}),
             "max_activation": max((float(e["max_activation"]) for e in examples), default=0.0)}
    return FeatureInput(key[0], key[1], stats, examples)


def explain_circuit(adapter: ModelAdapter, transcoder: Transcoder, store: FeatureStore, transcoder_name: str,
                    features: Sequence[FeatureKey], docs: Sequence[str], explainer, corpus: str,
                    harvest_config: HarvestConfig = HarvestConfig(), *, force: bool = False, reharvest: bool = False,
                    chunk: int = 8, progress: Progress | None = None) -> ExplainReport:
    """Harvest and explain `features`, storing as it goes; see the module docstring."""
    say = progress or _quiet
    report = ExplainReport()
    states = store.features(transcoder_name, features)
    todo = [k for k in features if reharvest or needs_harvest(states[k], corpus, harvest_config.n_tokens)]
    # An explanation made from an earlier harvest may have seen what is now held out: redo it.
    fresh = set(todo)
    if todo:
        results = harvest(adapter, transcoder, docs, todo, harvest_config, corpus_name=corpus,
                          progress=lambda f, m: say(0.6 * f, m))
        for r in results:
            r.statistics["n_tokens_budget"] = harvest_config.n_tokens
        store.save_harvest(transcoder_name, results)
        report.harvested = len(results)
        states = store.features(transcoder_name, features)
    pending = []
    for key in features:
        st = states[key]
        done = any(e["source"] == explainer.source and e["model"] == explainer.model for e in st.explanations)
        if done and not force and key not in fresh:
            report.reused += 1
        else:
            pending.append(explainer_input(key, st))
    ids = {k: states[k].id for k in features}
    calls0, tokens0 = _spent(explainer)
    for start in range(0, len(pending), chunk):
        part = pending[start:start + chunk]
        results: list[ExplainResult] = explainer.explain_all(part)
        store.save_explanations(ids, results)
        for r in results:
            if r.text is None:
                report.errors[feature_name((r.layer, r.feature))] = r.error or "no explanation"
            else:
                report.explained += 1
        say(0.6 + 0.4 * min(start + chunk, len(pending)) / max(len(pending), 1),
            f"explained {min(start + chunk, len(pending))}/{len(pending)} features")
    calls1, tokens1 = _spent(explainer)
    report.calls, report.tokens = calls1 - calls0, tokens1 - tokens0
    return report


def _spent(agent) -> tuple[int, int]:
    """(calls, tokens) an explainer or rater has spent so far."""
    client = getattr(agent, "client", None)
    if client is not None:
        return client.usage.calls, client.usage.total_tokens
    return int(getattr(agent, "calls", 0)), int(getattr(agent, "tokens", 0))


@torch.no_grad()
def active_features(adapter: ModelAdapter, transcoder: Transcoder, windows: TokenWindows,
                    batch_size: int = 16) -> int:
    """Distinct (layer, feature) pairs active at a real, non-BOS position of `windows` (prompts)."""
    seen = torch.zeros(transcoder.n_layers, transcoder.n_features, dtype=torch.bool)
    valid_all = windows.valid
    for start in range(0, windows.ids.shape[0], batch_size):
        ids = windows.ids[start:start + batch_size].to(adapter.device)
        run = adapter.run(ids, windows.mask[start:start + batch_size].to(adapter.device), capture=True)
        valid = valid_all[start:start + batch_size]
        for layer in range(transcoder.n_layers):
            acts = transcoder.encode_layer(layer, run.resid_mid[layer].to(transcoder.dtype)).cpu()
            seen[layer] |= (acts[valid] != 0).any(0)
    return int(seen.sum())


def prompt_windows(batch) -> TokenWindows:
    """The clean prompts of a task PromptBatch as TokenWindows."""
    return TokenWindows(batch.clean_ids, batch.attention_mask, batch.has_bos, list(range(len(batch))))


def tokens_to_text(tokens: Sequence[str]) -> str:
    """Join per-token strings: as they are when the tokenizer keeps leading spaces, else with spaces."""
    if any(t[:1].isspace() for t in tokens if t):
        return "".join(tokens)
    return " ".join(t for t in tokens if t)


def text_windows(tokenizer, texts: Sequence[str]) -> TokenWindows:
    """Texts tokenised (a BOS first when the tokenizer has one) into TokenWindows."""
    bos = tokenizer.bos_token_id
    rows = [([bos] if bos is not None else []) + (tokenizer(t, add_special_tokens=False)["input_ids"] or
                                                  [tokenizer.eos_token_id or 0]) for t in texts]
    return pad_windows(rows, bos is not None, pad_id=tokenizer.pad_token_id or 0)


def score_circuit(adapter: ModelAdapter, transcoder: Transcoder, store: FeatureStore, transcoder_name: str,
                  features: Sequence[FeatureKey], docs: Sequence[str], rater: Rater, source: str = "any",
                  config: ScoreConfig = ScoreConfig(), progress: Progress | None = None,
                  corpus: str | None = None) -> ScoreReport:
    """FADE scores of the latest explanation (of `source`, or any) of each feature; stored as they come."""
    say = progress or _quiet
    report = ScoreReport()
    states = store.features(transcoder_name, features)
    jobs: list[tuple[FeatureKey, FeatureState, dict[str, Any]]] = []
    for key in features:
        st = states[key]
        cands = [e for e in st.explanations if source == "any" or e["source"] == source]
        stats = st.statistics or {}
        if not cands:
            report.errors[feature_name(key)] = f"no explanation (source {source}) to score"
        elif not stats or "split" not in stats:
            report.errors[feature_name(key)] = "not harvested (with the explain/held-out split): run the explain job"
        elif corpus is not None and stats.get("corpus") != corpus:
            report.errors[feature_name(key)] = (f"harvested on corpus '{stats.get('corpus')}', not '{corpus}': "
                                                "score it on its own corpus, where its split is known")
        else:
            jobs.append((key, st, cands[-1]))
    if not jobs:
        return report
    keys = [k for k, _, _ in jobs]
    tok = adapter.tokenizer
    rng = random.Random(config.seed)
    # Random natural windows of held-out documents, shared by all features: [N, T, n]. From the
    # end of the held-out documents (the harvest reads from the start of the corpus).
    say(0.02, "activations of random held-out corpus windows")
    held = split_documents(docs, HOLDOUT)[::-1]
    pool = corpus_windows(tok, [d for _, d in held], max(config.n_natural * 64, 2000), 32)
    pool.doc = [held[i][0] for i in pool.doc]                      # corpus indices, for the record
    pick = sorted(rng.sample(range(pool.ids.shape[0]), min(config.n_natural, pool.ids.shape[0])))
    natural = pad_windows([pool.ids[i][pool.mask[i].bool()].tolist() for i in pick], pool.has_bos,
                          pad_id=tok.pad_token_id or 0)
    nat_acts = window_activations(adapter, transcoder, natural, keys)
    nat_texts = [tok.decode(natural.ids[i][natural.valid[i]].tolist()) for i in range(len(pick))]
    nat_act = fade.text_activation(nat_acts.permute(2, 0, 1).reshape(len(keys) * len(pick), -1).numpy()) \
        .reshape(len(keys), len(pick))                                                            # [n, N]
    report.texts["natural_docs"] = sorted({pool.doc[i] for i in pick})
    calls0, tokens0 = _spent(rater)

    # Clarity: texts generated to express each explanation, all run through the model at once.
    say(0.1, "generating concept texts")
    generated: dict[int, list[str]] = {}
    for j, (key, _, expl) in enumerate(jobs):
        try:
            generated[j] = rater.generate(expl["text"], config.n_generated)
        except Exception as err:
            report.errors[feature_name(key)] = f"generation failed: {type(err).__name__}: {err}"
    flat = [(j, t) for j, ts in generated.items() for t in ts]
    concept_act: dict[int, list[float]] = {}
    if flat:
        win = text_windows(tok, [t for _, t in flat])
        acts = window_activations(adapter, transcoder, win, keys, batch_size=32)                  # [M, T, n]
        rows = torch.tensor([j for j, _ in flat])
        own = acts[torch.arange(len(flat)), :, rows]                                              # [M, T]
        for (j, _), a in zip(flat, fade.text_activation(own.numpy())):
            concept_act.setdefault(j, []).append(float(a))

    # Faithfulness: steered continuations for every feature in one batched generation.
    continuations: np.ndarray | None = None
    if config.faithfulness:
        say(0.3, "steering")
        long = [i for i in range(pool.ids.shape[0]) if int(pool.mask[i].sum()) >= config.steer_prompt_len]
        chosen = sorted(rng.sample(long, min(config.n_steer_prompts, len(long)))) if long else []
        if chosen:
            report.texts["steer_docs"] = sorted({pool.doc[i] for i in chosen})
            prompts = pool.ids[chosen, :config.steer_prompt_len]
            max_acts = [float(st.statistics.get("max_activation") or 0.0) or 1.0 for _, st, _ in jobs]
            continuations = steered_continuations(adapter, transcoder, keys, max_acts, prompts,
                                                  config.factors, config.n_new_tokens).numpy()

    for j, (key, st, expl) in enumerate(jobs):
        name = feature_name(key)
        say(0.4 + 0.6 * j / len(jobs), f"rating feature {name}")
        scores: dict[str, float | None] = {}
        try:
            held_out = [e for e in st.examples if e.get("split") == HOLDOUT]
            ex_texts = [tokens_to_text(e["tokens"]) for e in held_out]
            ex_act = [float(fade.text_activation(np.asarray([e["activations"]], dtype=float))[0]) for e in held_out]
            texts = ex_texts + nat_texts
            acts = np.r_[np.asarray(ex_act, dtype=float), nat_act[j]]
            ratings = np.asarray(rater.rate(expl["text"], texts))
            scores["responsiveness"] = fade.responsiveness(acts, ratings)
            scores["purity"] = fade.purity(acts, ratings)
            if j in concept_act:
                scores["clarity"] = fade.clarity(concept_act[j], nat_act[j])
            if continuations is not None:
                F, P, _ = continuations[j].shape
                cont_texts = [tok.decode(continuations[j, f, p].tolist()) for f in range(F) for p in range(P)]
                cr = rater.rate(expl["text"], cont_texts)
                by_factor = {float(config.factors[f]): cr[f * P:(f + 1) * P] for f in range(F)}
                scores["faithfulness"] = fade.faithfulness(by_factor, baseline=0.0)
        except Exception as err:
            report.errors[name] = f"{type(err).__name__}: {err}"
        defined = {m: v for m, v in scores.items() if v is not None}
        if defined:
            store.save_scores(expl["id"], defined, rater.name)
            report.scored += 1
        report.scores[name] = scores
        human = store.human_ratings(expl["id"])
        if human:  # held-out examples only: the explainer saw the others
            ranked = [(r, e) for r, e in ((e["rank"], e) for e in st.examples if e.get("split") == HOLDOUT)
                      if r in human]
            h_act = [float(fade.text_activation(np.asarray([e["activations"]], dtype=float))[0]) for _, e in ranked]
            h_rat = [human[r] for r, _ in ranked]
            hs = {"responsiveness": fade.responsiveness(h_act, h_rat), "purity": fade.purity(h_act, h_rat)}
            hs = {m: v for m, v in hs.items() if v is not None}
            if hs:
                store.save_scores(expl["id"], hs, "human")
    calls1, tokens1 = _spent(rater)
    report.calls, report.tokens = calls1 - calls0, tokens1 - tokens0
    say(1.0, f"scored {report.scored} explanations")
    return report
