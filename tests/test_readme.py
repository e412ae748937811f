"""The README's quick-start code runs as written and prints what the README says."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(capsys):
    text = README.read_text()
    block = text.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(block, "README quick start", "exec"), {})
    out = capsys.readouterr().out
    assert "[23, 26, 26] 11 11 True" in out  # the comment next to that print in the README
    assert "tracked set: complete" in out
