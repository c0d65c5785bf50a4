"""examples/own_model.py on tiny generated data (docs/OWN_MODEL.md's code blocks run in
tests/test_docs.py with every page's)."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_example_trains_both_models_and_prints_the_diagnostics(capsys):
    spec = importlib.util.spec_from_file_location("own_model", ROOT / "examples" / "own_model.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--tasks", "2", "--train_size", "32", "--eval_size", "16", "--batch_size", "8",
                  "--width", "16", "--generated"])
    lines = capsys.readouterr().out.splitlines()
    init = [line for line in lines if " init: " in line]
    assert [line.split(" init")[0] for line in init] == ["linen CNN task 0", "linen CNN task 1",
                                                         "nnx MLP task 0", "nnx MLP task 1"]
    for line in init:
        estimate, low, high = map(float, re.search(
            r"eps-rank ([\d.]+) \[([\d.]+), ([\d.]+)\]", line).groups())
        assert 0 <= low <= estimate <= high <= 1
        for rank, dim in re.findall(r"(\d+)/(\d+)", line):
            assert 0 < int(rank) <= int(dim)
    assert "| hidden_0 rank A " in init[2] and "| conv_0 rank A " in init[0]
    assert sum(" end: held-out accuracy " in line for line in lines) == 4
