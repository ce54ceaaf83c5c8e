"""The command line: listings work, and bad input is one clear line with exit code 2."""

from __future__ import annotations

import pytest

from backend.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_the_demo(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0 and "gemma-3-270m" in out and "gemma3" in out


def test_tasks_lists_every_task(capsys):
    code, out, _ = run(capsys, "tasks")
    assert code == 0
    for name in ("ioi", "docstring", "greater-than", "jsonl"):
        assert name in out


def test_tasks_prints_pairs_without_a_model(capsys):
    code, out, _ = run(capsys, "tasks", "ioi", "-n", "3")
    assert code == 0 and out.count("clean:") == 3


@pytest.mark.parametrize("argv, needle", [
    (("tasks", "nope"), "unknown task 'nope'"),
    (("tasks", "ioi", "--model", "no-such-model"), "unknown model 'no-such-model'"),
    (("tasks", "jsonl", "--path", "/nonexistent/pairs.jsonl"), "/nonexistent/pairs.jsonl"),
    (("tasks", "ioi", "-n", "0"), "-n"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_malformed_jsonl_names_the_line(capsys, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"text_clean": "a", "text_corr": "b", "io_clean": "x", "s_clean": "y"}\n{oops\n')
    code, _, err = run(capsys, "tasks", "jsonl", "--path", str(path))
    assert code == 2 and "line 2" in err and len(err.strip().splitlines()) == 1


def test_a_directory_that_is_not_a_model_is_rejected(capsys, tmp_path):
    code, _, err = run(capsys, "tasks", "ioi", "--model", str(tmp_path))
    assert code == 2 and "config.json" in err


# prune and sweep on a tiny model reachable by name -------------------------------------------
from tests.api_fixtures import TINY_CLT, TINY_MODEL, tiny_cache  # noqa: E402,F401  (fixture)


@pytest.fixture
def cache_env(tiny_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("PIESCOPE_MODELS_CACHE", str(tiny_cache))
    monkeypatch.setenv("PIESCOPE_DATA_DIR", str(tmp_path / "data"))
    return tiny_cache


def test_prune_writes_a_circuit(capsys, cache_env, tmp_path):
    import json
    out = tmp_path / "circuit.json"
    code, stdout, _ = run(capsys, "prune", "--model", TINY_MODEL, "--transcoder", TINY_CLT, "--task", "ioi",
                          "-n", "4", "--method", "fap", "--k", "5", "--out", str(out))
    assert code == 0 and "KL" in stdout
    data = json.loads(out.read_text())
    assert data["method"] == "fap" and data["k"] == 5 and len(data["prompts"]) == 4
    assert all(len(p["kept"]) == min(5, p["n_active"]) for p in data["prompts"])
    assert {"layer", "feature", "position", "score"} <= set(data["prompts"][0]["kept"][0])
    assert data["features"][0]["n_prompts"] >= data["features"][-1]["n_prompts"]


def test_sweep_writes_rows_and_a_plot(capsys, cache_env, tmp_path):
    import json
    out, png = tmp_path / "sweep.json", tmp_path / "kl.png"
    code, stdout, _ = run(capsys, "sweep", "--model", TINY_MODEL, "--transcoder", TINY_CLT, "--task", "ioi",
                          "-n", "4", "--methods", "fap,random", "--ks", "2,5", "--out", str(out),
                          "--plot", str(png))
    assert code == 0
    data = json.loads(out.read_text())
    assert [(r["method"], r["k"]) for r in data["rows"]] == [("fap", 2), ("fap", 5), ("random", 2), ("random", 5)]
    assert set(data["effective_compression"]) == {"fap", "random"}
    assert png.stat().st_size > 1000


def test_sweep_tests_fap_synergy_at_50_against_fap_run_at_k_prime_and_75(capsys, cache_env, tmp_path):
    """The acceptance run of issue 10: `sweep --methods fap,fap-synergy --ks 50,100`."""
    import json
    out = tmp_path / "sweep.json"
    code, stdout, err = run(capsys, "sweep", "--model", TINY_MODEL, "--transcoder", TINY_CLT, "--task", "ioi",
                            "-n", "4", "--methods", "fap,fap-synergy", "--ks", "50,100", "--tost-margin", "0.2",
                            "--no-random-curve", "--out", str(out))
    assert code == 0, err
    data = json.loads(out.read_text())
    row = next(e for e in data["effective_budget"] if e["method"] == "fap-synergy" and e["k"] == 50)
    assert row["base"] == "fap" and row["margin"] == 0.2 and row["k_claimed"] == 75
    assert row["k_equivalent"] is not None and row["k_base"] == round(row["k_equivalent"])
    for key in ("p_lower", "p_upper", "p_value", "claimed_p_lower", "claimed_p_upper", "claimed_p_value"):
        assert 0.0 <= row[key] <= 1.0, key
    ran_75 = data["budget_runs_kl"]["75"]
    assert row["base_kl_at_k_claimed"] == pytest.approx(sum(ran_75) / len(ran_75))
    at_k_base = data["budget_runs_kl"].get(str(row["k_base"])) or data["per_prompt_kl"]["fap"][str(row["k_base"])]
    assert row["base_kl_at_k_base"] == pytest.approx(sum(at_k_base) / len(at_k_base))
    assert "Effective budget against fap" in stdout and "TOST p" in stdout
    code, _, err = run(capsys, "sweep", "--model", TINY_MODEL, "--transcoder", TINY_CLT, "--task", "ioi",
                       "-n", "2", "--methods", "fap", "--ks", "5", "--tost-margin", "-1")
    assert code == 2 and "--tost-margin" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (("--method", "fap", "--k", "0"), "K must be"),
    (("--method", "fap", "--k", "100001"), "K must be a whole number from 1 to 100000"),
    (("--method", "nope", "--k", "5"), "unknown method 'nope'"),
    (("--method", "fap", "--k", "5", "--options", "{oops"), "--options"),
])
def test_bad_prune_input_is_one_line(capsys, cache_env, argv, needle):
    code, _, err = run(capsys, "prune", "--model", TINY_MODEL, "--transcoder", TINY_CLT, "--task", "ioi",
                       "-n", "2", *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_a_transcoder_for_another_model_is_one_line(capsys, cache_env, tmp_path):
    from backend.models.transcoder import Transcoder, TranscoderConfig
    from backend.models.transcoder_files import save_transcoder
    save_transcoder(Transcoder.random(TranscoderConfig("clt", 2, 32, 8, "relu")), tmp_path / "wrong")
    code, _, err = run(capsys, "prune", "--model", TINY_MODEL, "--transcoder", str(tmp_path / "wrong"),
                       "--task", "ioi", "-n", "2", "--method", "fap", "--k", "3")
    assert code == 2 and "2" in err and "3" in err and "layer" in err


def test_train_clt_writes_a_loadable_transcoder(capsys, cache_env, tmp_path):
    from backend.models.transcoder_files import load_transcoder
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(["Then, Mary and John went to the store. John gave a drink to Mary."] * 60))
    (corpus / "b.txt").write_text(" ".join(["When Alice and Bob got a snack at the park, Bob gave it to Alice."] * 60))
    out = tmp_path / "clt"
    code, stdout, err = run(capsys, "train-clt", "--model", TINY_MODEL, "--corpus", str(corpus),
                            "--features-per-layer", "16", "--k", "4", "--tokens", "512", "--heldout-tokens", "64",
                            "--steps", "4", "--batch-size", "128", "--out", str(out))
    assert code == 0, err
    tc = load_transcoder(out)
    assert (tc.n_layers, tc.d_model, tc.n_features) == (3, 32, 16)
    assert (out / "training_report.json").is_file()
