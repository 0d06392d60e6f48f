"""broden._progress: tqdm on a terminal, one plain line per bar (no carriage returns) elsewhere."""
from __future__ import annotations

import io

import pytest

from broden import _progress
from broden._progress import LineProgress, progress, set_quiet


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _loud():
    set_quiet(False)
    yield
    set_quiet(False)


def test_non_terminal_output_is_one_line_per_bar_without_carriage_returns(capfd) -> None:
    total = 0
    for i in progress(range(50), desc="stage 1: thresholds", unit="img"):
        total += i
    bar = progress(total=7, desc="decoding Broden", unit="img")
    for _ in range(7):
        bar.update(1)
    bar.close()
    bar.close()  # a second close writes nothing more
    err = capfd.readouterr().err
    assert total == sum(range(50)) and "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("stage 1: thresholds: 50/50 img in ") and lines[0].endswith(" s")
    assert lines[1].startswith("decoding Broden: 7/7 img in ")


def test_quiet_switch_and_disable_still_silence_every_bar(capfd) -> None:
    set_quiet(True)
    assert list(progress(range(3), desc="a")) == [0, 1, 2]
    set_quiet(False)
    bar = progress(total=2, desc="b", disable=True)
    bar.update(2)
    bar.close()
    assert capfd.readouterr().err == ""


def test_a_bar_that_does_not_leave_writes_no_final_line(capfd) -> None:
    assert list(progress(range(4), desc="epoch 1/2 train", leave=False)) == [0, 1, 2, 3]
    assert capfd.readouterr().err == ""


def test_a_long_bar_writes_at_most_one_line_per_interval(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(_progress, "_clock", lambda: now[0])
    out = io.StringIO()
    bar = progress(total=10, desc="hashing Broden files", unit="file", file=out)
    assert isinstance(bar, LineProgress)
    for step in range(10):
        now[0] += 25.0  # 60 s (LINE_INTERVAL_S) passed at 75, 150 and 225 s: a line each, no more
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["hashing Broden files: 3/10 file (30 %), 75 s", "hashing Broden files: 6/10 file (60 %), 150 s",
                     "hashing Broden files: 9/10 file (90 %), 225 s", "hashing Broden files: 10/10 file in 250.0 s"]


def test_byte_counts_are_scaled_and_an_unknown_total_is_counted(monkeypatch) -> None:
    out = io.StringIO()
    bar = progress(total=None, desc="broden1_224.zip", unit="B", unit_scale=True, file=out)
    bar.update(3 * 1024 * 1024)
    bar.close()
    assert out.getvalue().startswith("broden1_224.zip: 3.00MB in ")


def test_a_terminal_keeps_tqdm() -> None:
    tty = _Tty()
    bar = progress(total=3, desc="x", file=tty)
    assert not isinstance(bar, LineProgress)
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue()


def test_cli_quiet_holds_for_one_call_only(tmp_path, capfd) -> None:
    # --quiet through an in-process main() once leaked into every later call (a notebook's, a test's)
    from cgl_train.cli import main as train_main
    from dissect.cli import main as dissect_main

    assert dissect_main(["synth", "--out", str(tmp_path / "ds"), "--per-class", "1", "--size", "32",
                         "--quiet"]) == 0
    assert _progress._QUIET is False and "synthesizing" not in capfd.readouterr().err.lower()
    assert train_main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert _progress._QUIET is False
    bar = progress(total=1, desc="after")
    bar.update(1)
    bar.close()
    assert "after: 1/1" in capfd.readouterr().err
