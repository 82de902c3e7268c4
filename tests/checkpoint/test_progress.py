"""The one progress bar (tqdm): drawn on a terminal only, silent when quiet, bytes in GB."""

import io

import pytest

from grok.progress import progress_bar


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    ("stream", "quiet", "drawn"),
    [(io.StringIO(), False, False), (Tty(), True, False), (Tty(), False, True)],
)
def test_drawn_on_a_terminal_only(stream, quiet, drawn):
    with progress_bar(2_000_000_000, desc="loading x", quiet=quiet, file=stream) as bar:
        bar.update(1_000_000_000)
        bar.update(1_000_000_000)
    assert bool(stream.getvalue()) == drawn
    if drawn:
        line = stream.getvalue().strip().split("\r")[-1]
        assert line.startswith("loading x: 100%") and "2.00G/2.00G " in line and "B/s" in line


def test_steps_resume_from_initial():
    stream = Tty()
    with progress_bar(10, desc="training", unit="step", initial=4, file=stream) as bar:
        bar.set_postfix_str("loss 1.234", refresh=False)
        bar.update(1)
    line = stream.getvalue().strip().split("\r")[-1]
    assert "5/10" in line and "loss 1.234" in line and "step" in line
