"""summary.json is written whole or not at all."""
from __future__ import annotations

import json

import pytest

from experiments.summary import write_summary


def test_write_summary_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_summary({"metric": 0.1}, path)
    write_summary({"metric": 0.2}, path)
    assert json.loads(path.read_text()) == {"metric": 0.2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_summary_keeps_the_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "summary.json"
    write_summary({"metric": 0.1}, path)
    with pytest.raises(TypeError):
        write_summary({"metric": object()}, path)
    assert json.loads(path.read_text()) == {"metric": 0.1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
