"""The training-step benchmark (workers/benchmarks/train_step.py) runs end to end on a small CNN;
it prints figures, it asserts none about speed."""

import json

import torch
from torch import nn

from workers.benchmarks import train_step


def test_saved_bytes_count_each_saved_activation_once_and_no_parameter():
    # y = relu(w * x): autograd saves x and w for the product (w is a parameter: not counted) and
    # relu's output; the loss's logsumexp saves that output again (counted once) and its own result.
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(256))

        def forward(self, x):
            return torch.relu(self.w * x)

    x = torch.randn(4, 256)
    assert train_step.saved_activation_bytes(Scaled(), x) == (2 * x.numel() + len(x)) * 4


def test_a_step_of_a_small_cnn_is_timed_and_its_saved_memory_counted(capsys):
    assert train_step.main(["--architectures", "cifar-cnn", "--batch", "8", "--steps", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    row = json.loads(printed[0])
    assert (row["architecture"], row["batch"], row["bits"], row["device"]) == ("cifar-cnn", 8, 4, "cpu")
    assert row["step_ms"] > 0 and row["saved_mib"] > 0
    assert printed[-1].split()[:4] == ["cifar-cnn", "8", "4", "no"]


def test_bf16_shrinks_what_the_layers_save():
    # Under bf16 autocast a layer saves its bf16 operands for the backward pass, half the bytes of
    # float32 ones, where the quantizers (float32) save theirs at full size.
    fp32 = train_step.measure("cifar-cnn", 8, 4, torch.device("cpu"), steps=1)
    bf16 = train_step.measure("cifar-cnn", 8, 4, torch.device("cpu"), steps=1, bf16=True)
    assert bf16["bf16"] and 0.5 * fp32["saved_mib"] < bf16["saved_mib"] < fp32["saved_mib"]
