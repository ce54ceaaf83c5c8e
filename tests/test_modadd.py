"""The modular-addition model PIEscope trains itself, and the modadd task (DESIGN 8.4)."""

from __future__ import annotations

import json

import pytest
import torch

from backend.cli import main
from backend.errors import NotFoundError, UserError
from backend.models.loading import load_model
from backend.settings import Settings
from backend.tasks import get_task, metric
from backend.toys.modadd import (ModAddConfig, answer_logits, build_model, make_tokenizer, prompt_ids,
                                 prompt_text, split_pairs, train_modadd)


@pytest.fixture(scope="module")
def trained_p7(tmp_path_factory):
    """(models_cache, result) of a p=7 model trained to 100% train accuracy in a few hundred steps."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = ModAddConfig(p=7, steps=300, train_frac=0.5, eval_every=50, stop_at_accuracy=None)
    return cache, train_modadd(cfg, cache / "modadd-7", progress=False)


def test_tokenizer_matches_prompt_ids():
    tok = make_tokenizer(11)
    a, b = torch.tensor([3, 10, 0]), torch.tensor([5, 0, 10])
    texts = [tok(prompt_text(int(x), int(y)))["input_ids"] for x, y in zip(a, b)]
    assert torch.equal(torch.tensor(texts), prompt_ids(a, b, 11))
    assert tok.encode(" 7", add_special_tokens=False) == [7]  # number n is token id n


def test_split_covers_every_pair_once():
    train, test = split_pairs(13, 0.3, seed=1)
    pairs = {tuple(r) for r in torch.cat([train, test]).tolist()}
    assert len(pairs) == 169 and len(train) == round(0.3 * 169)
    assert torch.equal(split_pairs(13, 0.3, seed=1)[0], train)  # seeded


def test_fast_answer_logits_equal_the_full_forward():
    model = build_model(ModAddConfig(p=17, d_model=32, d_mlp=64)).eval()
    torch.nn.init.normal_(model.transformer.wpe.weight)  # positions matter in the comparison
    a, b = torch.randint(0, 17, (40,)), torch.randint(0, 17, (40,))
    ids = prompt_ids(a, b, 17)
    with torch.no_grad():
        assert torch.allclose(answer_logits(model, ids), model(input_ids=ids).logits[:, -1], atol=1e-5)


def test_trainer_reaches_full_train_accuracy(trained_p7):
    cache, result = trained_p7
    assert result.train_accuracy == 1.0
    report = json.loads((cache / "modadd-7" / "training_report.json").read_text())
    assert report["complete"] and report["curve"][-1]["train_accuracy"] == 1.0
    assert (cache / "modadd-7" / "accuracy_curve.png").stat().st_size > 1000
    corpus = (cache / "modadd-7" / "corpus.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["text"] for line in corpus) == sorted(
        prompt_text(a, b) for a in range(7) for b in range(7))


def test_saved_model_loads_by_name_through_the_adapters(trained_p7):
    cache, _ = trained_p7
    adapter = load_model("modadd-7", Settings(models_cache=cache))
    assert adapter.family == "gpt2" and adapter.n_layers == 1 and adapter.d_model == 128
    batch = get_task("modadd").build(adapter.tokenizer, 20, seed=0)
    assert batch.has_bos and batch.clean_ids.shape == (20, 5)
    out = adapter.run(batch.clean_ids, batch.attention_mask, capture=True)
    with torch.no_grad():
        direct = answer_logits(adapter.model, batch.clean_ids)
    assert torch.allclose(out.logits, direct, atol=1e-5)
    assert out.resid_mid.shape == (1, 20, 5, 128)
    # The trained pairs are answered right; M = logit(c) - logit(c') is then positive on them.
    train, _ = split_pairs(7, 0.5, seed=0)
    ids = prompt_ids(train[:, 0], train[:, 1], 7)
    assert bool((adapter.run(ids).logits.argmax(-1) == train.sum(1) % 7).all())
    assert metric(out.logits, batch).shape == (20,)


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    cfg = ModAddConfig(p=5, d_model=16, n_heads=2, d_mlp=32, steps=30, eval_every=10, checkpoint_every=10,
                       stop_at_accuracy=None)
    straight = train_modadd(cfg, tmp_path / "a", progress=False)
    partial = train_modadd(cfg, tmp_path / "b", progress=False, stop_after_step=20)
    assert not partial.report["complete"] and (tmp_path / "b" / "checkpoint.pt").exists()
    with pytest.raises(UserError, match="checkpoint"):
        train_modadd(cfg, tmp_path / "b", progress=False)
    resumed = train_modadd(cfg, tmp_path / "b", progress=False, resume=True)
    assert resumed.report["curve"] == straight.report["curve"]
    from safetensors.torch import load_file
    wa, wb = load_file(tmp_path / "a/model/model.safetensors"), load_file(tmp_path / "b/model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_modadd_task_pairs():
    tok = make_tokenizer(13)
    pairs = get_task("modadd").generate(50, seed=3, tokenizer=tok)
    for pair in pairs:
        a, b, a2, p = (pair.meta[k] for k in ("a", "b", "a_corrupted", "p"))
        assert p == 13 and a != a2 and pair.clean == f"{a} + {b} =" and pair.corrupted == f"{a2} + {b} ="
        assert pair.answer == f" {(a + b) % 13}" and pair.distractors == (f" {(a2 + b) % 13}",)
    batch = get_task("modadd").build(tok, 50, seed=3)
    assert len(batch) == 50 and not batch.dropped
    assert bool((batch.answer_ids[:, 0] != batch.distractor_ids[:, 0]).all())
    with pytest.raises(UserError, match="single tokens"):
        get_task("modadd", p=20).generate(5, tokenizer=tok)


def test_an_untrained_toy_names_its_command(tmp_path):
    with pytest.raises(NotFoundError, match="piescope train-toy modadd --p 113"):
        load_model("modadd-113", Settings(models_cache=tmp_path))


def test_train_toy_cli(capsys, tmp_path):
    code = main(["train-toy", "modadd", "--p", "5", "--steps", "20", "--out", str(tmp_path / "m")])
    out, err = capsys.readouterr()
    assert code == 0 and "train-clt" in out and (tmp_path / "m" / "model" / "config.json").is_file()
    code = main(["train-toy", "modadd", "--p", "1", "--out", str(tmp_path / "x")])
    out, err = capsys.readouterr()
    assert code == 2 and "p must be" in err and len(err.strip().splitlines()) == 1


def test_modadd_task_can_corrupt_b():
    pairs = get_task("modadd", corrupt="b").generate(20, seed=1, tokenizer=make_tokenizer(11))
    for pair in pairs:
        m = pair.meta
        assert m["a_corrupted"] == m["a"] and m["b_corrupted"] != m["b"]
        assert pair.distractors == (f" {(m['a'] + m['b_corrupted']) % 11}",)
    with pytest.raises(UserError, match="corrupt"):
        get_task("modadd", corrupt="c")
