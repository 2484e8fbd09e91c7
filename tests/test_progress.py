"""Progress on stderr: a redrawn bar on a terminal, whole plain lines anywhere else."""

from __future__ import annotations

import io
import sys

from tokenmill.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_gets_whole_lines_without_carriage_returns(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    bar = progress_bar(total=3, unit="row")
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = sys.stderr.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert text.splitlines()[-1].startswith("100%") and "3/3" in text.splitlines()[-1]


def test_a_terminal_gets_tqdms_redrawn_bar_and_disabled_prints_nothing(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = progress_bar(total=2, unit="row")
    bar.update(2)
    bar.close()
    assert "\r" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    quiet = progress_bar(total=2, disable=True)
    quiet.update(2)
    quiet.close()
    assert sys.stderr.getvalue() == ""
