"""HAGD end to end on a tiny model, the learned scorer, and the command line."""

from __future__ import annotations

import pytest
import torch

from backend.cli import main
from backend.errors import InvalidParameterError
from backend.hagd.hierarchy import Hierarchy
from backend.hagd.pipeline import HagdConfig, run_hagd, scorer_samples
from backend.hagd.scorer import (FEATURE_NAMES, LevelSample, build_scorer, leave_one_task_out,
                                 load_scorer)
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
    """Levels whose true effect is a fixed function of two cluster statistics (mass and size)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for level in range(1, n_levels + 1):
        k = 12
        x = torch.randn(k, len(FEATURE_NAMES), generator=g)
        y = 0.8 * x[:, 5] + 0.3 * torch.tanh(x[:, 0])
        out.append(LevelSample(task, level, x, torch.eye(k), y, x[:, 5] + 2.0 * torch.randn(k, generator=g)))
    return out


def test_scorer_learns_a_relation_shared_across_tasks_and_beats_a_noisy_mass():
    samples = [s for t in range(3) for s in synthetic_samples(f"task{t}", 4, seed=t)]
    rows = leave_one_task_out(samples, epochs=200)
    assert [r["heldout"] for r in rows] == ["task0", "task1", "task2"]
    assert all(r["gnn_spearman"] > 0.8 for r in rows)
    assert all(r["gnn_spearman"] > r["mass_spearman"] for r in rows)


def test_scorer_file_round_trip(tmp_path):
    samples = [s for t in range(2) for s in synthetic_samples(f"t{t}", 2, seed=t)]
    scorer = build_scorer(samples, epochs=20)
    path = scorer.save(tmp_path / "scorer.pt")
    loaded = load_scorer(path)
    x, a = samples[0].x, samples[0].a_hat
    with torch.no_grad():
        assert torch.equal(scorer.model(scorer.norm(x), a), loaded.model(loaded.norm(x), a))
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
])
def test_cli_bad_input_is_one_line(capsys, argv, needle):
    code = main(["hagd", "--model", "x", "--transcoder", "x/y", "--task", "modadd", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_scorer_sources_take_task_options():
    from backend.cli.hagd import task_with_options
    task = task_with_options("modadd+corrupt=b+p=7")
    assert task.corrupt == "b" and task.p == 7
