"""The training progress line and its pieces."""

from __future__ import annotations

import pytest

from mmdc.train.progress import eta_seconds, format_duration, progress_line


def test_format_duration():
    assert format_duration(7.4) == "7s"
    assert format_duration(125) == "2m05s"
    assert format_duration(3723) == "1h02m03s"
    assert format_duration(-3) == "0s"


def test_eta_uses_this_attempts_pace():
    assert eta_seconds(0, 10.0, 5) is None  # no step yet: no pace
    assert eta_seconds(4, 20.0, 6) == pytest.approx(30.0)
    assert eta_seconds(4, 20.0, 0) == 0.0


def test_progress_line_reads_like_a_bar():
    line = progress_line("tune-1", 5, 20, 65.0, 195.0, 0, 1.23456, 2e-5, 3.21, 456.7)
    assert line.startswith("[tune-1] [#####---------------] step 5/20  25.0%")
    assert "1m05s elapsed, ETA 3m15s" in line
    assert "loss 1.2346 lr 2.00e-05" in line and "3.2 samples/s 457 tok/s" in line
    assert "ETA ?" in progress_line("r", 1, 4, 1.0, None, 0, 1.0, 1e-3, 1.0, 1.0)
    assert "[####################] step 4/4 100.0%" in progress_line("r", 4, 4, 1.0, 0.0, 0, 1.0, 1e-3, 1.0, 1.0)
