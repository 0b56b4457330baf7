"""How the PyTorch fold's time grows with the number of BNs (issue 15's engine, step "speed").

Builds a stack of ``n`` residual blocks (conv -> BN -> ReLU -> conv -> BN, + input), so ``2n`` BNs
fold by conv-bn, and times ``bnfold.fold_module(model, example, verify=False)`` (trace, shape
propagation and the rules; no verification runs) in process CPU seconds (machines here are
shared: CPU time is steadier than wall time), best of ``--repeat``. Before the indexes of
tensor uses and in-place writes were made cheap to rebuild, every fold rebuilt them over the
whole graph with costly lookups, so the time grew quadratically.

    python benchmarks/torch_fold_scaling.py                     # 50, 100, 200, 400 BNs
    python benchmarks/torch_fold_scaling.py --blocks 25 50 100 200

To compare two checkouts side by side in one run, point PYTHONPATH at each in turn:

    for tree in /path/to/old /path/to/new; do PYTHONPATH=$tree python benchmarks/torch_fold_scaling.py; done
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import bnfold


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.relu(inputs + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(inputs))))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[25, 50, 100, 200])
    parser.add_argument("--repeat", type=int, default=3)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # CPU time of the fold itself, not of idle intra-op threads
    example = torch.randn(1, 8, 8, 8)
    bnfold.fold_module(nn.Sequential(Block(8)).eval(), example, verify=False)  # warm up imports
    print(f"bnfold from {bnfold.__file__}")
    print("| BNs | fold_module (verify=False), CPU s | per BN, ms |")
    print("|---|---|---|")
    for blocks in arguments.blocks:
        model = nn.Sequential(*[Block(8) for _ in range(blocks)]).eval()
        best = float("inf")
        for _ in range(arguments.repeat):
            start = time.process_time()
            result = bnfold.fold_module(model, example, verify=False)
            best = min(best, time.process_time() - start)
        assert len(result.report.folded) == 2 * blocks, result.report.summary()
        print(f"| {2 * blocks} | {best:.2f} | {1000 * best / (2 * blocks):.1f} |")


if __name__ == "__main__":
    main()
