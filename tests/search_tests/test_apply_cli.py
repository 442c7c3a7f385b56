"""search.apply refuses bad options in one line before loading any data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from search import apply as apply_cli


def test_a_bad_device_is_one_line_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": []}))

    def no_work(*args, **kwargs):
        raise AssertionError("the workbench must not load")

    monkeypatch.setattr(apply_cli, "rebuild", no_work)
    with pytest.raises(SystemExit) as info:
        apply_cli.main([str(plan), "--preset", "digits", "--out", str(tmp_path / "x.pcz"), "--device", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown device 'bogus'; use cpu, cuda or cuda:N"
