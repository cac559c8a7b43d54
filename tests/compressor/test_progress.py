"""compressor.progress: the library asks for a bar; the caller's setting decides what it is."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from compressor.progress import NullProgress, open_progress, progress_bar, tqdm_progress


@dataclass
class Bar:
    desc: str
    total: int | None
    unit: str
    n: int = 0
    postfix: str = ""
    closed: int = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        self.closed += 1


class Recorder:
    def __init__(self) -> None:
        self.bars: list[Bar] = []

    def __call__(self, desc: str, total: int | None, unit: str) -> Bar:
        self.bars.append(Bar(desc, total, unit))
        return self.bars[-1]


@pytest.mark.parametrize("setting", [False, None])
def test_no_progress_is_a_null_bar(setting: bool | None) -> None:
    with progress_bar(setting, "calibrate", 3) as bar:
        assert isinstance(bar, NullProgress)
        assert bar.update(5) is None and bar.set_postfix_str("x") is None and bar.close() is None


def test_a_factory_gets_desc_total_unit_and_the_bar_is_closed_once() -> None:
    rec = Recorder()
    with progress_bar(rec, "distill", 10, unit="batch") as bar:
        bar.update()
        bar.update(3)
        bar.set_postfix_str("loss 0.1")
    assert rec.bars == [Bar("distill", 10, "batch", n=4, postfix="loss 0.1", closed=1)]


def test_defaults_are_an_unknown_total_in_steps() -> None:
    rec = Recorder()
    with progress_bar(rec, "search"):
        pass
    assert (rec.bars[0].total, rec.bars[0].unit) == (None, "step")


def test_initial_advances_a_resumed_bar_and_zero_does_not_call_update() -> None:
    rec = Recorder()
    bar = open_progress(rec, "distill", 100, initial=40)
    assert rec.bars[0].n == 40 and rec.bars[0].closed == 0  # open_progress leaves closing to the caller
    bar.close()
    calls: list[int] = []

    class Strict(Bar):
        def update(self, n: int = 1) -> None:
            calls.append(n)

    open_progress(lambda d, t, u: Strict(d, t, u), "x", 5)
    assert calls == []


def test_the_bar_is_closed_on_an_exception() -> None:
    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"), progress_bar(rec, "train", 5) as bar:
        bar.update()
        raise RuntimeError("boom")
    assert rec.bars[0].closed == 1 and rec.bars[0].n == 1


def test_true_means_a_tqdm_bar_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(True, "quantize", 2, unit="layer") as bar:
        assert type(bar).__module__.startswith("tqdm")
        assert (bar.desc, bar.total, bar.unit, bar.leave) == ("quantize", 2, "layer", False)  # type: ignore[attr-defined]
        bar.update(2)
    assert capsys.readouterr().out == ""  # the library never writes to stdout
    direct = tqdm_progress("x", None, "step")
    assert direct.total is None  # type: ignore[attr-defined]
    direct.close()
