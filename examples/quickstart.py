"""fxsplit in one page: give a two-task ResNet-18 per-task copies of three layers, check, and export it.

Run: python examples/quickstart.py [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision
from torch import nn

import fxsplit


class TwoTasks(nn.Module):
    """An ordinary multi-task network: one shared backbone, one head per task."""

    def __init__(self):
        super().__init__()
        self.backbone = torchvision.models.resnet18(num_classes=64)
        self.heads = nn.ModuleDict({"left": nn.Linear(64, 10), "right": nn.Linear(64, 10)})

    def forward(self, x):
        features = self.backbone(x)
        return {task: head(features) for task, head in self.heads.items()}


def main(out: Path) -> None:
    model = TwoTasks().eval()
    graph = fxsplit.layer_graph(model)
    print(f"{graph.number_of_nodes()} layers, e.g. {list(graph)[:3]}")

    layers = ["backbone.layer3.1.conv2", "backbone.layer4.0.bn1", "backbone.layer4.1.conv1"]
    x = torch.randn(4, 3, 64, 64)
    split = fxsplit.rewrite(model, layers, example_inputs=x).eval()  # checked against the model on x, both modes

    with torch.no_grad():
        before, after = model(x), split(x)
    error = max(((before[t] - after[t]).norm() / before[t].norm()).item() for t in split.tasks)
    added = sum(p.numel() for p in split.parameters()) - sum(p.numel() for p in model.parameters())
    print(f"split {len(layers)} layers for tasks {split.tasks}: +{added:,} parameters, "
          f"max relative output difference {error:.1e}")
    print(f"shared parameters: {sum(p.numel() for p in split.shared_parameters()):,}; "
          + ", ".join(f"{t} only: {sum(p.numel() for p in split.task_parameters(t)):,}" for t in split.tasks))

    out.mkdir(parents=True, exist_ok=True)
    for name in ("split.pt", "split.pt2"):
        print("exported and checked", fxsplit.export(split, out / name, x))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="fxsplit-")))
    main(parser.parse_args().out)
