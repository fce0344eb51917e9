"""The epoch-floor benchmark (workers/benchmarks/epoch_floor.py) runs end to end on the digits,
shortened; it prints figures, it asserts none about speed."""

import json

import pytest
import torch

from workers.benchmarks import epoch_floor
from workers.engine.data import load_dataset


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)  # main() sets one thread


def test_the_floor_reads_every_batch_of_an_epoch(monkeypatch):
    split = load_dataset("digits", 0).train.subset(torch.arange(130))
    seen = []
    original = type(split).training_batch

    def counting(self, index, generator, device):
        seen.append(len(index))
        return original(self, index, generator, device)

    monkeypatch.setattr(type(split), "training_batch", counting)
    seconds = epoch_floor.floor_epoch_seconds(split, batch_size=64, device="cpu", epochs=2)
    assert seen == [64, 64, 2] * 2
    assert seconds > 0


def test_a_short_digits_run_prints_its_row_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = epoch_floor.main(["--configs", "digits", "--retrain-epochs", "1", "--qmul-epochs", "1",
                             "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    row_line = next(line for line in printed.splitlines() if line.startswith("digits "))
    assert "144/1293" in row_line  # 10% of the 1,437 digits training samples forgotten
    (row,) = json.loads(out.read_text())
    assert row["retrain_epochs"] == 1 and row["qmul_epochs"] == 1
    assert row["forget"] + row["retain"] == 1437
    for key in ("floor_retain_epoch_s", "floor_train_epoch_s", "retrain_s", "qmul_agr_full_s", "qmul_agr_sampled_s"):
        assert row[key] > 0, key
    # One epoch of QAT already classifies most digits: the accuracies are measured, not placeholders.
    assert 50 < row["retrain_ta"] <= 100 and 50 < row["qmul_ta"] <= 100 and 0 <= row["qmul_fa"] <= 100


def test_the_levers_run_and_name_their_row(capsys):
    assert epoch_floor.main(["--configs", "digits", "--retrain-epochs", "1", "--qmul-epochs", "1",
                             "--contiguous", "--bf16"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["config"] == "digits NCHW bf16"
    assert 50 < row["retrain_ta"] <= 100 and 50 < row["qmul_ta"] <= 100


def test_cuda_is_refused_where_there_is_none(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        epoch_floor.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda" in capsys.readouterr().err
