"""`undying batch` without Ray: batch and run identities, the results file's repair, the
command that continues a batch."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from undying._batch import batch_id_for, continue_command, parse_questions, prepare_results


def test_batch_id_is_the_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    same_names = batch_id_for(a / "q.jsonl", a / "r.jsonl"), batch_id_for(b / "q.jsonl", b / "r.jsonl")
    assert same_names[0] != same_names[1]
    assert batch_id_for(a / "q.jsonl", a / "r.jsonl") != batch_id_for(a / "q.jsonl", a / "r2.jsonl")
    monkeypatch.chdir(a)
    assert batch_id_for(Path("q.jsonl"), Path("r.jsonl")) == same_names[0]


def test_run_ids_follow_each_lines_content() -> None:
    lines = [json.dumps({"id": f"q{i}", "question": f"question {i}"}) for i in range(3)]
    items, bad = parse_questions("\n".join(lines), "bX")
    assert not bad
    assert [it.run_id.split("-")[:2] for it in items] == [["bX", "00001"], ["bX", "00002"],
                                                         ["bX", "00003"]]
    # key order and spacing are not content
    respaced = lines[:1] + ['{"question":  "question 1", "id": "q1"}'] + lines[2:]
    assert [it.run_id for it in parse_questions("\n".join(respaced), "bX")[0]] == \
        [it.run_id for it in items]
    edited = lines[:1] + [json.dumps({"id": "q1", "question": "question 1, edited"})] + lines[2:]
    again = parse_questions("\n".join(edited), "bX")[0]
    assert [a.run_id == b.run_id for a, b in zip(items, again, strict=True)] == [True, False, True]
    assert again[1].task == "question 1, edited"


def _row(run_id: str, line: int) -> str:
    return json.dumps({"run_id": run_id, "line": line, "answer": "a"}) + "\n"


def test_a_torn_last_line_is_cut_off(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    whole = _row("bX-00001-aaaa", 1)
    torn = _row("bX-00002-bbbb", 2)[:25]
    out.write_text(whole + torn)
    written, notes = prepare_results(out, "bX", {"bX-00001-aaaa", "bX-00002-bbbb"})
    assert written == {"bX-00001-aaaa"}
    assert out.read_text() == whole
    assert "cut short" in notes[0]


def test_a_whole_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text(_row("bX-00001-aaaa", 1).rstrip("\n"))
    written, notes = prepare_results(out, "bX", {"bX-00001-aaaa"})
    assert written == {"bX-00001-aaaa"} and not notes
    assert out.read_text() == _row("bX-00001-aaaa", 1)


def test_results_of_edited_lines_are_dropped_others_kept(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    rows = [_row("bX-00001-aaaa", 1), _row("bX-00002-old0", 2), _row("bOTHER-00002-cccc", 2),
            "a line someone wrote by hand\n"]
    out.write_text("".join(rows))
    written, notes = prepare_results(out, "bX", {"bX-00001-aaaa", "bX-00002-new0"})
    assert written == {"bX-00001-aaaa"}
    assert out.read_text() == rows[0] + rows[2] + rows[3]
    assert "bX-00002-old0" in notes[0]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_no_results_file_yet(tmp_path: Path) -> None:
    assert prepare_results(tmp_path / "r.jsonl", "bX", {"bX-00001-aaaa"}) == (set(), [])


def test_continue_command_names_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "my dir"
    d.mkdir()
    monkeypatch.chdir(d)
    cmd = continue_command(Path("q.jsonl"), Path("r.jsonl"),
                           ["batch", "q.jsonl", "--out", "r.jsonl", "--concurrency", "2"])
    assert shlex.split(cmd) == ["undying", "batch", str(d / "q.jsonl"), "--out",
                                str(d / "r.jsonl"), "--concurrency", "2"]
    eq = continue_command(Path("q.jsonl"), Path("r.jsonl"), ["batch", "q.jsonl", "--out=r.jsonl"])
    assert shlex.split(eq)[-1] == f"--out={d / 'r.jsonl'}"
    (d / "model.toml").write_text("")
    opts = continue_command(Path("q.jsonl"), Path("r.jsonl"),
                            ["batch", "q.jsonl", "--out", "r.jsonl", "--model-config", "model.toml",
                             "--agent", "pkg.mod:lead", "--latency", "0.3"])
    assert shlex.split(opts)[5:] == ["--model-config", str(d / "model.toml"), "--agent",
                                     "pkg.mod:lead", "--latency", "0.3"]
    bare = continue_command(Path("q.jsonl"), Path("r.jsonl"), None)
    assert shlex.split(bare)[:2] == ["undying", "batch"] and os.sep in shlex.split(bare)[2]
