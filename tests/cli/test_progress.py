"""``ProgressDisplay``: a live bar on a terminal, plain lines elsewhere, nothing when quiet.

Pure: the display writes to a ``StringIO`` that says it is (or is not) a
terminal, as stderr would. The commands' own use of it is checked in
``test_compact.py`` (plain lines from ``rebuild``, nothing with ``-q``).
"""

from __future__ import annotations

import io
import re

from deltalog.cli.progress import ProgressDisplay


class Terminal(io.StringIO):
    """What rich sees as a terminal: ``isatty`` is true."""

    def isatty(self) -> bool:
        return True


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_a_terminal_gets_a_live_bar_with_the_count_the_total_and_the_figures() -> None:
    tty = Terminal()
    with ProgressDisplay("compact", unit="seqs", total=10, stream=tty) as display:
        assert display.live
        display.update(4, vectors=40)
        display.note("skipped line 3: not JSON")
    shown = ANSI.sub("", tty.getvalue())
    assert "compact" in shown and "4/10" in shown and "40 vectors" in shown
    assert "skipped line 3: not JSON" in shown
    assert "compact: 4/10 seqs" not in shown, "no plain line on a terminal"
    assert "\x1b[" in tty.getvalue(), "drawn with terminal control codes"


def test_elsewhere_plain_lines_at_most_every_interval_and_one_at_the_end() -> None:
    pipe = io.StringIO()
    with ProgressDisplay("ingest", unit="receipts", stream=pipe, interval=3600) as display:
        assert not display.live
        display.update(1, vectors=10)  # the first update prints
        display.update(2, vectors=20)  # within the interval: not printed
        display.note("skipped line 3: not JSON")
        display.update(3, total=3, vectors=30)
    lines = pipe.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "ingest: 1 receipts",
        "skipped line 3: not JSON",
        "ingest: 3/3 receipts",
    ]
    assert "\x1b[" not in pipe.getvalue()
    assert re.search(r", 30 vectors \([\d,]+/s\)$", lines[-1]), lines[-1]


def test_quiet_shows_nothing_on_a_terminal_or_elsewhere() -> None:
    for stream in (Terminal(), io.StringIO()):
        with ProgressDisplay("compact", unit="seqs", total=5, quiet=True, stream=stream) as d:
            assert not d.live
            d.update(5, vectors=3)
            d.note("a note")
        assert stream.getvalue() == ""
        assert d.completed == 5, "the count is still kept"


def test_quiet_hides_progress_not_warnings() -> None:
    for stream in (Terminal(), io.StringIO()):
        with ProgressDisplay("ingest", unit="lines", quiet=True, stream=stream) as d:
            d.update(1)
            d.warn("skipped: r.jsonl:2: not JSON")
        assert ANSI.sub("", stream.getvalue()).strip() == "skipped: r.jsonl:2: not JSON"


def test_a_stage_counts_something_else_from_zero() -> None:
    pipe = io.StringIO()
    with ProgressDisplay("mirror bootstrap", unit="records", total=5, stream=pipe) as display:
        display.update(5)
        display.stage("mirror", unit="seqs", total=2)
        assert (display.completed, display.figures, display.total) == (0, {}, 2)
        display.update(2, vectors=7)
    lines = [line.split(" (")[0] for line in pipe.getvalue().splitlines()]
    assert lines == ["mirror bootstrap: 5/5 records", "mirror: 2/2 seqs"]
    tty = Terminal()
    with ProgressDisplay("verify: committed copy", unit="seqs", stream=tty) as display:
        display.stage("verify: rebuild", unit="seqs", total=3)
        display.update(3)
    assert "verify: rebuild" in ANSI.sub("", tty.getvalue())
