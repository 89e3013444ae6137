"""Progress bars of the long phases (pretrain.runlog.progress_bar): feature extraction and kNN voting show a tqdm bar
with a count and an ETA on rank 0's stderr, refresh slowly when stderr is not a terminal, stay silent for phases
shorter than PROGRESS_DELAY_S and on other ranks."""
import io
import re
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import pretrain.distributed as du
import pretrain.knn as knn
import pretrain.runlog as runlog


@pytest.fixture
def shown(monkeypatch):
    """Bars displayed from the start and at every update (a tiny run is over long before the real delay)."""
    monkeypatch.setattr(runlog, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(runlog, "PROGRESS_INTERVAL_S", (0.0, 0.0))


def _data(n=10):
    return TensorDataset(torch.arange(n * 12, dtype=torch.float32).view(n, 3, 2, 2), torch.zeros(n, dtype=torch.long))


def test_feature_extraction_and_knn_vote_show_a_bar_with_an_eta(capsys, shown):
    feats = knn.extract_features(torch.nn.Flatten(), _data(10), torch.device("cpu"), batch_size=4,
                                 desc="train features")
    assert torch.equal(feats, _data(10).tensors[0].flatten(1))  # the bar changes nothing
    err = capsys.readouterr().err
    # count, elapsed < remaining (the ETA) and the rate, in tqdm's format; the finished bar is kept
    assert re.search(r"train features: +0%\|.*\| 0/10 \[00:00<\?", err), err
    assert re.search(r"train features: +40%\|.*\| 4/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s\]", err), err
    assert re.search(r"train features: 100%\|.*\| 10/10 \[\d\d:\d\d<00:00", err), err
    assert err.endswith("\n")

    f = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    knn.knn_predict(f, torch.arange(30) % 3, f[:6], 3, k=5, chunk=4)
    assert re.search(r"kNN vote: 100%\|.*\| 6/6 \[", capsys.readouterr().err)


def test_short_phases_and_other_ranks_print_nothing(capsys, monkeypatch):
    monkeypatch.setattr(runlog, "PROGRESS_DELAY_S", 1e6)  # a phase shorter than the delay: no bar at all
    knn.extract_features(torch.nn.Flatten(), _data(10), torch.device("cpu"), batch_size=4)
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(runlog, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(du, "get_rank", lambda: 1)
    with runlog.progress_bar(5, "rank 1") as bar:
        assert bar.disable
        bar.set_postfix(loss="1.0", refresh=False)
        bar.update(5)
    assert capsys.readouterr().err == ""


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_refresh_interval_depends_on_whether_stderr_is_a_terminal(monkeypatch):
    with runlog.progress_bar(3, "log file") as bar:  # pytest's captured stderr is not a terminal
        assert bar.mininterval == runlog.PROGRESS_INTERVAL_S[1] == 5.0 and bar.delay == runlog.PROGRESS_DELAY_S == 3.0
        assert bar.fp is not None and not bar.disable
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with runlog.progress_bar(3, "terminal") as bar:
        assert bar.mininterval == runlog.PROGRESS_INTERVAL_S[0] == 1.0


def test_rank_0_leaves_disable_to_tqdm(monkeypatch):
    """Rank 0 does not pass ``disable``, so tqdm's default applies, and with it TQDM_DISABLE=1 (read by tqdm at
    import) turns the bars off; other ranks pass disable=True."""
    import tqdm

    calls = []
    monkeypatch.setattr(tqdm, "tqdm", lambda **kw: calls.append(kw))
    runlog.progress_bar(3, "rank 0")
    monkeypatch.setattr(du, "get_rank", lambda: 2)
    runlog.progress_bar(3, "rank 2")
    assert "disable" not in calls[0] and calls[1]["disable"] is True
    assert calls[0]["file"] is sys.stderr and calls[0]["total"] == 3 and calls[0]["desc"] == "rank 0"


def test_a_bar_under_the_pretraining_bar_is_drawn_below_it_and_cleared(capsys, shown):
    """The kNN monitor extracts features while the pretraining loop's bar is open: its bar takes the next line and
    is erased when done (the pretraining bar, pretrain/hooks.py, stays alone); a bar on its own is kept."""
    from tqdm import tqdm

    outer = tqdm(total=10, desc="pretraining")  # as MetricsWriter's: tqdm's default file, stderr
    capsys.readouterr()
    knn.extract_features(torch.nn.Flatten(), _data(4), torch.device("cpu"), batch_size=2, desc="kNN bank features")
    inner = capsys.readouterr().err
    outer.close()
    assert re.search(r"^\n\rkNN bank features: +0%", inner) and "kNN bank features: 100%" in inner  # one line down
    assert re.search(r"\n\r +\x1b\[A$", inner), repr(inner)  # blanked, cursor back up to the pretraining bar
