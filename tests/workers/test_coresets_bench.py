"""The coreset benchmark end to end on digits (one-epoch models): it shares bench.py's stages and
writes its table, its JSON and its plot."""

import json

from workers.benchmarks import bench, coresets

ARGS = ["--dataset", "digits", "--model", "digits-cnn", "--seeds", "0", "--original-epochs", "1",
        "--unlearn-epochs", "1", "--threads", "1", "--no-progress", "--name", "tiny", "--mia-draws", "2",
        "--sizes", "0.2", "--selectors", "random", "res", "--approximate-reference", "--bootstrap"]


def test_coresets_bench_writes_its_rows_and_shares_bench_stages(tmp_path, monkeypatch):
    assert coresets.main(ARGS + ["--out", str(tmp_path)]) == 0
    run_dir = tmp_path / "tiny"
    table = (run_dir / "coresets.md").read_text()
    for needle in ["| qmul | 1293 |", "| qmul c=0.2 random | 259 |", "| qmul c=0.2 res | 259 |",
                   "| approx c=0.2 res |", "| bootstrap c=0.2 random +CLC | 287 |", "| bootstrap full | 1437 |"]:
        assert needle in table, needle
    assert (run_dir / "coresets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run_dir / "coresets.json").read_text())
    rows = results["per_seed"]["0"]
    assert rows["qmul c=0.2 res"]["config"]["retain_coreset"] == 0.2
    assert rows["qmul"]["config"]["retain_coreset"] is None
    assert results["table"]["retrain"]["AG"] == 0.0
    # The approximate reference's AG is its distance to the full reference.
    approx = rows["approx c=0.2 random"]["metrics"]
    expected = sum(abs(approx[k] - rows["retrain"]["metrics"][k]) for k in ("FA", "RA", "TA", "MIA")) / 4
    assert abs(results["table"]["approx c=0.2 random"]["AG"] - expected) < 1e-9

    # bench.py finds the original and the reference this run trained: nothing is trained again.
    def refuse(*args, **kwargs):
        raise AssertionError("a cached stage ran again")

    monkeypatch.setattr(bench, "train_model", refuse)
    monkeypatch.setattr(coresets, "train_model", refuse)
    monkeypatch.setattr(coresets, "unlearn", refuse)
    assert coresets.main(ARGS + ["--out", str(tmp_path)]) == 0
    assert json.loads((run_dir / "coresets.json").read_text())["table"] == results["table"]
