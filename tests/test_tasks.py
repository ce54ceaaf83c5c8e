"""Tasks: generation, tokenisation and filtering, the metric kinds, JSONL input, the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from backend.errors import InvalidParameterError, NotFoundError, UserError
from backend.tasks import (TASKS, PromptBatch, PromptPair, get_task, last_logits, list_tasks, metric,
                           tokenize_pairs)
from backend.tasks.ioi import NAMES, TEMPLATES, IOITask
from tests.tokenizers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def digit_tok():
    return tiny_tokenizer(digits="digits")


def _batch(kind: str, answers: list[list[int]], distractors: list[list[int]]) -> PromptBatch:
    """A PromptBatch with only the fields `metric` reads filled meaningfully."""
    n = len(answers)
    ids = torch.zeros(n, 2, dtype=torch.long)
    pairs = [PromptPair("a", "b", " x", (" y",)) for _ in range(n)]
    return PromptBatch(pairs, ids, ids, torch.ones_like(ids), torch.ones(n, dtype=torch.long),
                       torch.tensor(answers), torch.tensor(distractors), kind, True, {})


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["ioi", "docstring", "greater-than"])
def test_generation_is_deterministic_by_seed(name: str, tok) -> None:
    task = get_task(name)
    a, b, c = task.generate(20, seed=3, tokenizer=tok), task.generate(20, seed=3, tokenizer=tok), task.generate(20, seed=4, tokenizer=tok)
    assert a == b
    assert a != c
    # A prefix property lets build() over-generate without changing the first pairs.
    assert task.generate(5, seed=3, tokenizer=tok) == a[:5]


def test_ioi_orders_answer_and_distractor() -> None:
    pairs = IOITask().generate(40, seed=0)
    assert {p.meta["order"] for p in pairs} == {"ABBA", "BABA"}
    assert {p.meta["template"] for p in pairs} <= set(range(len(TEMPLATES))) and len(TEMPLATES) == 15
    for p in pairs:
        io, s = p.meta["io"], p.meta["s"]
        assert p.answer == " " + io and p.distractors == (" " + s,)
        first, second = (io, s) if p.meta["order"] == "ABBA" else (s, io)
        assert p.clean.index(first) < p.clean.index(second)
        # S appears twice, IO once, and the prompt stops right before IO.
        assert len(re.findall(rf"\b{s}\b", p.clean)) == 2 and len(re.findall(rf"\b{io}\b", p.clean)) == 1


def _name_slots(text: str) -> list[str]:
    return [w for w in re.findall(r"[A-Za-z]+", text) if w in NAMES]


def test_ioi_abc_replaces_all_three_names() -> None:
    for p in IOITask("abc").generate(30, seed=1):
        clean_names = _name_slots(p.clean)
        corr_names = _name_slots(p.corrupted)
        assert len(clean_names) == len(corr_names) == 3
        assert not set(corr_names) & {p.meta["io"], p.meta["s"]}
        assert len(set(corr_names)) == 3  # no repetition left
        # Everything but the names is unchanged.
        assert re.sub("|".join(clean_names), "#", p.clean) == re.sub("|".join(corr_names), "#", p.corrupted)


def test_ioi_s2_swap_changes_only_s2(tok) -> None:
    for p in IOITask("s2").generate(30, seed=2):
        clean_ids = tok(p.clean)["input_ids"]
        corr_ids = tok(p.corrupted)["input_ids"]
        diff = [i for i, (a, b) in enumerate(zip(clean_ids, corr_ids)) if a != b]
        assert len(diff) == 1
        s2_pos = max(i for i, t in enumerate(clean_ids) if t == tok.convert_tokens_to_ids(p.meta["s"]))
        assert diff == [s2_pos]
        assert tok.convert_ids_to_tokens(corr_ids[s2_pos]) not in (p.meta["io"], p.meta["s"])


def test_ioi_filters_names_by_tokenizer() -> None:
    few = tiny_tokenizer(extra_words=["Mary John Eric Anna went"], include_task_words=False)
    assert IOITask("s2").names_for(few) == ["John", "Eric", "Mary"]  # Anna is not in NAMES
    pairs = IOITask("s2").generate(6, tokenizer=few)
    assert {n for p in pairs for n in _name_slots(p.clean + " " + p.corrupted)} <= {"John", "Eric", "Mary"}
    with pytest.raises(UserError, match="at least 5 names"):
        IOITask("abc").generate(3, tokenizer=few)
    with pytest.raises(InvalidParameterError):
        IOITask("xyz")  # type: ignore[arg-type]


def test_docstring_prompt_structure(tok) -> None:
    for p in get_task("docstring").generate(10, seed=0, tokenizer=tok):
        p1, p2, a, b, c, s = p.meta["args"]
        assert p.answer == " " + c
        assert set(p.distractors) == {" " + w for w in (p1, p2, a, b, s)}
        assert f":param {a}:" in p.clean and f":param {b}:" in p.clean and p.clean.endswith(":param")
        ra, rb = p.meta["replaced"]
        assert f":param {ra}:" in p.corrupted and f":param {rb}:" in p.corrupted
        assert p.clean.split("\n")[0] == p.corrupted.split("\n")[0]  # signature unchanged


# ---------------------------------------------------------------- tokenisation and filtering


@pytest.mark.parametrize("name", ["ioi", "docstring", "greater-than"])
def test_build_returns_n_equal_length_pairs(name: str, tok) -> None:
    batch = get_task(name).build(tok, 12, seed=0)
    assert len(batch) == 12 and batch.metric_kind == TASKS[name].metric_kind
    assert batch.clean_ids.shape == batch.corrupted_ids.shape == batch.attention_mask.shape
    assert batch.has_bos and bool((batch.clean_ids[:, 0] == tok.bos_token_id).all())
    for i, p in enumerate(batch.pairs):
        ids = tok(p.clean)["input_ids"]
        assert len(ids) == len(tok(p.corrupted)["input_ids"]) == int(batch.last_pos[i]) + 1
        assert batch.clean_ids[i, : len(ids)].tolist() == ids
        assert batch.attention_mask[i].sum() == len(ids)
        assert bool((batch.clean_ids[i, len(ids):] == tok.pad_token_id).all())
    assert (batch.answer_ids[:, 0] >= 0).all() and (batch.distractor_ids[:, 0] >= 0).all()
    with pytest.raises(InvalidParameterError):
        get_task(name).build(tok, 0)


def test_tokenize_pairs_drops_and_reports(tok) -> None:
    good = PromptPair("Then, Mary and John went to the store. John gave a drink to", "Then, Amy and Eric went to the store. Kyle gave a drink to", " Mary", (" John",))
    longer = PromptPair("Mary went to the store", "Mary went to the big store", " Mary", (" John",))
    multi = PromptPair("John gave a drink to", "Eric gave a drink to", " Mary Ann", (" John",))
    bad_dist = PromptPair("John gave a drink to", "Eric gave a drink to", " Mary", (" Zorgblat",))
    batch = tokenize_pairs(tok, [good, longer, multi, bad_dist], "logit_diff")
    assert batch.pairs == [good]
    assert batch.dropped == {"length mismatch": 1, "answer not one token": 1, "distractor not one token": 1}
    assert batch.answer_ids.tolist() == [[tok.convert_tokens_to_ids("Mary")]]
    with pytest.raises(UserError, match=r"3 dropped.*length mismatch: 1"):
        tokenize_pairs(tok, [longer, multi, bad_dist], "logit_diff")
    # add_bos=False strips the tokenizer's BOS.
    assert not tokenize_pairs(tok, [good], "logit_diff", add_bos=False).has_bos


def test_subset_trims_padding_and_to(tok) -> None:
    pairs = [PromptPair("John gave a drink to", "Eric gave a drink to", " Mary", (" John",)),
             PromptPair("Then, Mary and John went to the store. John gave a drink to",
                        "Then, Amy and Eric went to the store. Kyle gave a drink to", " Mary", (" John",))]
    batch = tokenize_pairs(tok, pairs, "logit_diff")
    assert batch.clean_ids.shape[1] == 16
    short = batch.subset([0])
    assert short.clean_ids.shape == (1, 6) and short.pairs == pairs[:1]
    assert batch.subset(slice(1, 2)).clean_ids.shape == (1, 16)
    assert batch.to("cpu").clean_ids.equal(batch.clean_ids)


# ---------------------------------------------------------------- metric


def test_metric_kinds_match_hand_computation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 6, requires_grad=True)
    L = logits.detach()
    answers = [[1, -1, -1], [4, 5, -1], [0, 2, 3]]
    distractors = [[2, 3], [0, -1], [5, -1]]

    ld = metric(logits, _batch("logit_diff", answers, distractors))
    assert torch.allclose(ld, torch.stack([L[0, 1] - L[0, 2], L[1, 4] - L[1, 0], L[2, 0] - L[2, 5]]))

    ldm = metric(logits, _batch("logit_diff_max", answers, distractors))
    want = torch.stack([L[0, 1] - max(L[0, 2], L[0, 3]), L[1, 4] - L[1, 0], L[2, 0] - L[2, 5]])
    assert torch.allclose(ldm, want)

    p = L.softmax(-1)
    pd = metric(logits, _batch("prob_diff", answers, distractors))
    want = torch.stack([p[0, 1] - p[0, 2] - p[0, 3], p[1, 4] + p[1, 5] - p[1, 0], p[2, 0] + p[2, 2] + p[2, 3] - p[2, 5]])
    assert torch.allclose(pd, want)

    lse = metric(logits, _batch("logsumexp", answers, distractors))
    assert torch.allclose(lse, L.exp().sum(-1).log())

    (ld.sum() + ldm.sum() + pd.sum() + lse.sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # logit_diff_max sends gradient only to the answer and the best valid distractor; the -1 pads
    # (gathered as id 0 internally) must not leak, e.g. the pad of row 2 would otherwise compete.
    g = torch.zeros_like(L, requires_grad=True)
    metric(L + g, _batch("logit_diff_max", answers, distractors)).sum().backward()
    best0 = [-1, 0] if L[0, 2] > L[0, 3] else [0, -1]
    assert g.grad.tolist() == [[0, 1, *best0, 0, 0], [-1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1]]


def test_metric_rejects_bad_shapes_and_kinds() -> None:
    with pytest.raises(InvalidParameterError):
        metric(torch.zeros(2, 5), _batch("logit_diff", [[0]], [[1]]))
    with pytest.raises(InvalidParameterError):
        metric(torch.zeros(1, 5), _batch("nope", [[0]], [[1]]))


def test_last_logits_picks_last_real_token() -> None:
    logits = torch.arange(2 * 4 * 3, dtype=torch.float).reshape(2, 4, 3)
    out = last_logits(logits, torch.tensor([3, 1]))
    assert out.shape == (2, 3) and out.tolist() == [logits[0, 3].tolist(), logits[1, 1].tolist()]


# ---------------------------------------------------------------- greater-than


def test_greater_than_two_digit_tokens(tok) -> None:
    batch = get_task("greater-than").build(tok, 10, seed=0)
    for i, p in enumerate(batch.pairs):
        yy = int(p.meta["yy"])
        assert p.meta["regime"] == "pairs" and 2 <= yy <= 98
        assert p.corrupted.endswith(p.clean[-2:]) and f"{p.meta['xx']}01" in p.corrupted
        answers = {tok.convert_ids_to_tokens(t) for t in batch.answer_ids[i].tolist() if t >= 0}
        distractors = {tok.convert_ids_to_tokens(t) for t in batch.distractor_ids[i].tolist() if t >= 0}
        assert answers == {f"{y:02d}" for y in range(yy + 1, 100)}
        assert distractors == {f"{y:02d}" for y in range(0, yy + 1)}
    # All mass on "99" gives M = 1; all on "00" gives M = -1.
    logits = torch.full((len(batch), len(tok)), -1e4)
    logits[:, tok.convert_tokens_to_ids("99")] = 0
    assert torch.allclose(metric(logits, batch), torch.ones(len(batch)))


def test_greater_than_single_digit_tokens(digit_tok) -> None:
    batch = get_task("greater-than").build(digit_tok, 10, seed=0)
    assert batch.dropped == {}
    for i, p in enumerate(batch.pairs):
        first = int(p.meta["yy"][0])
        assert p.meta["regime"] == "digits" and 1 <= first <= 8
        answers = {int(digit_tok.convert_ids_to_tokens(t)) for t in batch.answer_ids[i].tolist() if t >= 0}
        distractors = {int(digit_tok.convert_ids_to_tokens(t)) for t in batch.distractor_ids[i].tolist() if t >= 0}
        assert answers == set(range(first + 1, 10)) and distractors == set(range(first))


# ---------------------------------------------------------------- JSONL


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_happy_path(tmp_path: Path, tok) -> None:
    rows = [
        {"text_clean": "Then, Mary and John went to the store. John gave a drink to",
         "text_corr": "Then, Amy and Eric went to the store. Kyle gave a drink to", "io_clean": "Mary", "s_clean": "John"},
        {"text_clean": "When Amy and Eric got a ring at the house, Eric gave it to ",
         "text_corr": "When Sara and Paul got a ring at the house, Mark gave it to ", "io_clean": "Amy", "s_clean": " Eric"},
    ]
    path = _write(tmp_path / "pairs.jsonl", [json.dumps(rows[0]), "", json.dumps(rows[1])])
    task = get_task("jsonl", path=str(path))
    pairs = task.generate(5)
    assert [p.answer for p in pairs] == [" Mary", "Amy"] and [p.distractors for p in pairs] == [(" John",), (" Eric",)]
    assert pairs[1].meta["line"] == 3
    batch = task.build(tok, 2)
    assert len(batch) == 2 and batch.metric_kind == "logit_diff"
    assert task.generate(2, seed=1) == task.generate(2, seed=1)


def test_jsonl_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="nope.jsonl"):
        get_task("jsonl", path=str(tmp_path / "nope.jsonl"))
    good = json.dumps({"text_clean": "a", "text_corr": "b", "io_clean": "c", "s_clean": "d"})
    bad = _write(tmp_path / "bad.jsonl", [good, good, "{not json"])
    with pytest.raises(UserError, match=r"bad\.jsonl: line 3: invalid JSON"):
        get_task("jsonl", path=str(bad))
    missing = _write(tmp_path / "missing.jsonl", [good, json.dumps({"text_clean": "a", "text_corr": "b", "io_clean": "c"})])
    with pytest.raises(UserError, match=r"line 2: missing field\(s\) s_clean"):
        get_task("jsonl", path=str(missing))
    with pytest.raises(InvalidParameterError, match="path"):
        get_task("jsonl")


# ---------------------------------------------------------------- registry


def test_registry() -> None:
    assert list(TASKS) == ["ioi", "docstring", "greater-than", "jsonl", "modadd"]
    with pytest.raises(NotFoundError) as err:
        get_task("nonexistent")
    assert all(name in str(err.value) for name in TASKS)
    listed = {t["name"]: t["metric"] for t in list_tasks()}
    assert listed == {"ioi": "logit_diff", "docstring": "logit_diff_max", "greater-than": "prob_diff", "jsonl": "logit_diff",
                      "modadd": "logit_diff"}
    assert get_task("ioi", corruption="s2").corruption == "s2"
    with pytest.raises(InvalidParameterError):
        get_task("ioi", colour="red")
