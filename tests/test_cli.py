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
