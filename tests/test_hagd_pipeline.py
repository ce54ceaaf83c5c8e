"""HAGD end to end on a tiny model, the learned scorer, and the command line."""

from __future__ import annotations

import pytest
import torch

from backend.cli import main
from backend.errors import InvalidParameterError
from backend.hagd.hierarchy import Hierarchy
from backend.hagd.pipeline import HagdConfig, run_hagd, scorer_samples
from backend.hagd.scorer import (FEATURE_NAMES, ClusterGNN, LevelSample, build_scorer, fit_scorer,
                                 leave_one_task_out, load_scorer)
from backend.tasks import get_task
from tests.pie_fixtures import pie_setup

SMALL = dict(pool=12, ratio=3.0, top=3, steps=15, lr=0.3, verify_seeds=2, verify_n=3)


def test_run_hagd_on_a_tiny_model():
    s = pie_setup("llama", n_prompts=4, n_features=12, n_layers=2)
    result = run_hagd(s.adapter, s.transcoder, get_task("ioi"), 4, HagdConfig(**SMALL), model_name="tiny",
                      transcoder_name="tiny/clt", task_name="ioi")
    Hierarchy.from_json(result.hierarchy).check()
    assert result.levels[0] == result.graph["n_nodes"] and result.levels[-1] <= 3
    assert result.search["evaluations"] == sum(t["scored"] for t in result.search["trace"])
    assert set(result.verification) == {"hagd", "fap", "random"}
    k = len(result.circuit)
    assert all(v["n_features"] == k for v in result.verification.values())
    assert all(len(v["sufficiency"]) == 2 for v in result.verification.values())
    assert result.to_json()["circuit"] == result.circuit


def synthetic_samples(task: str, n_levels: int, seed: int) -> list[LevelSample]:
    """Levels whose true log effect is a fixed function of two cluster statistics (the first-order
    effect and size), with a task-specific scale the centred loss must ignore; mass is a noisy
    version of the effect."""
    g = torch.Generator().manual_seed(seed)
    first, size = FEATURE_NAMES.index("log_first_order"), FEATURE_NAMES.index("log_size")
    out = []
    for level in range(1, n_levels + 1):
        k = 12
        x = torch.randn(k, len(FEATURE_NAMES), generator=g)
        y = torch.exp(0.8 * x[:, first] + 0.5 * torch.tanh(x[:, size]) + seed)
        out.append(LevelSample(task, level, x, torch.eye(k), y, y * torch.exp(2.0 * torch.randn(k, generator=g))))
    return out


def test_scorer_learns_a_relation_shared_across_tasks_and_beats_a_noisy_mass():
    samples = [s for t in range(3) for s in synthetic_samples(f"task{t}", 4, seed=t)]
    rows = leave_one_task_out(samples, epochs=200)
    assert [r["heldout"] for r in rows] == ["task0", "task1", "task2"]
    assert all(r["gnn_spearman"] > 0.8 for r in rows)
    assert all(r["gnn_spearman"] > r["mass_spearman"] for r in rows)
    for r in rows:  # the gain over mass is the difference of the two, with a CI around it
        gain, lo, hi = r["gain_over_mass"]
        assert gain == pytest.approx(r["gnn_spearman"] - r["mass_spearman"], abs=1e-9)
        assert lo <= gain <= hi


def test_an_untrained_scorer_ranks_by_mass_and_alpha_gates_the_residual():
    """At initialisation the blend is log mass and the residual a constant, so the ranking is the
    baseline's; alpha = 0 turns the residual off whatever its weights."""
    mass = FEATURE_NAMES.index("log_mass")
    x = torch.randn(20, len(FEATURE_NAMES))
    model = ClusterGNN()
    pred = model(x, torch.eye(20)).detach()
    assert torch.equal(torch.argsort(pred), torch.argsort(x[:, mass]))
    torch.nn.init.normal_(model.out.weight)
    assert not torch.equal(torch.argsort(model(x, torch.eye(20)).detach()), torch.argsort(x[:, mass]))
    assert torch.allclose(model(x, torch.eye(20), alpha=0.0), x[:, mass])


def test_fit_scorer_keeps_the_residual_only_where_it_transfers():
    """A residual that fits noise in every task (labels = mass x noise) ranks unseen tasks worse,
    so the inner hold-out gives it no weight; a shared relation outside the blend (size) gets one."""
    def noisy(task: str, seed: int) -> list[LevelSample]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for level in (1, 2):
            x = torch.randn(12, len(FEATURE_NAMES), generator=g)
            y = torch.exp(x[:, FEATURE_NAMES.index("log_mass")] + 0.3 * torch.randn(12, generator=g))
            out.append(LevelSample(task, level, x, torch.eye(12), y, y))
        return out
    model, inner = fit_scorer([s for t in range(4) for s in noisy(f"n{t}", t)], epochs=100)
    assert float(model.alpha) == 0.0 and max(inner, key=inner.get) == 0.0
    model, inner = fit_scorer([s for t in range(4) for s in synthetic_samples(f"s{t}", 2, seed=t)], epochs=100)
    assert float(model.alpha) > 0.0


def test_leave_one_task_out_holds_out_every_variant_of_the_task():
    """A task with options on the same model ("modadd+corrupt=b") is the same task: training for
    either variant never sees the other."""
    samples = [s for t, seed in (("a@m", 0), ("a+corrupt=b@m", 1), ("b@m", 2), ("c@n", 3))
               for s in synthetic_samples(t, 2, seed=seed)]
    rows = {r["heldout"]: r["train_tasks"] for r in leave_one_task_out(samples, epochs=5)}
    assert rows["a@m"] == rows["a+corrupt=b@m"] == ["b@m", "c@n"]
    assert rows["b@m"] == ["a+corrupt=b@m", "a@m", "c@n"]


def test_scorer_file_round_trip(tmp_path):
    samples = [s for t in range(2) for s in synthetic_samples(f"t{t}", 2, seed=t)]
    scorer = build_scorer(samples, epochs=20)
    path = scorer.save(tmp_path / "scorer.pt")
    loaded = load_scorer(path)
    x, a = samples[0].x, samples[0].a_hat
    with torch.no_grad():
        assert torch.equal(scorer.model(x, a), loaded.model(x, a))
    assert float(loaded.model.alpha) == float(scorer.model.alpha)
    assert loaded.summary()["trained_on"] == ["t0", "t1"]


def test_scorer_samples_and_scorer_in_the_search(tmp_path):
    s = pie_setup("gpt2", n_prompts=3, n_features=8, n_layers=2)
    config = HagdConfig(**SMALL)
    samples = scorer_samples(s.adapter, s.transcoder, get_task("ioi"), 3, config, label="ioi@tiny")
    assert samples and all(len(x.y) == len(x.x) == len(x.a_hat) for x in samples)
    samples += scorer_samples(s.adapter, s.transcoder, get_task("docstring"), 3, config, label="doc@tiny")
    path = build_scorer(samples, epochs=20).save(tmp_path / "scorer.pt")
    result = run_hagd(s.adapter, s.transcoder, get_task("ioi"), 3,
                      HagdConfig(**SMALL, score="scorer", scorer_path=str(path)),
                      model_name="tiny", transcoder_name="tiny/clt", task_name="ioi")
    assert result.scorer["kind"] == "scorer" and result.scorer["trained_on"] == ["doc@tiny", "ioi@tiny"]


def test_bad_options():
    with pytest.raises(InvalidParameterError, match="unknown HAGD option"):
        HagdConfig.from_options({"poool": 3})
    with pytest.raises(InvalidParameterError, match="cluster score"):
        HagdConfig(score="magic")
    with pytest.raises(InvalidParameterError, match="scorer_path"):
        HagdConfig(score="scorer")


@pytest.mark.parametrize("argv, needle", [
    (["--options", '{"poool": 1}'], "unknown HAGD option"),
    (["--options", "{oops"], "--options"),
    (["-n", "0"], "-n must be"),
    (["--task", "modadd+corrupt"], "must be key=value"),
    (["--task", "modadd+colour=red"], "colour"),
])
def test_cli_bad_input_is_one_line(capsys, argv, needle):
    code = main(["hagd", "--model", "x", "--transcoder", "x/y", "--task", "modadd", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_scorer_sources_take_task_options():
    from backend.cli.hagd import task_with_options
    task = task_with_options("modadd+corrupt=b+p=7")
    assert task.corrupt == "b" and task.p == 7
