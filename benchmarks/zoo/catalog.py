"""Which models the sweep covers: every timm model and every torchvision classifier, with its family and its
parameter count (built on the meta device), cached in a CSV so that the catalog is built once."""

from __future__ import annotations

import csv
import dataclasses
import random
from collections.abc import Iterable
from pathlib import Path

import timm
import torchvision
from torchvision.models import list_models
from tqdm import tqdm

from benchmarks.zoo import hugging_face
from benchmarks.zoo.build import parameter_count
from tests.zoo import torchvision_family

# A fixed sample across families and kinds (CNN, ViT, MLP-mixer, hybrid with timm leaf modules, torchvision, a
# transformers model that only the torch.export route traces), small enough for CI.
CI_SAMPLE = ("timm/resnet10t", "timm/vit_tiny_patch16_224", "timm/mixer_s16_224", "timm/efficientvit_m0",
             "torchvision/squeezenet1_1", "transformers/bert")
TRANSFORMERS_SAMPLE = tuple(f"transformers/{model_type}" for model_type in hugging_face.MODELS)


@dataclasses.dataclass(frozen=True)
class Model:
    name: str  # "timm/<name>" or "torchvision/<name>"
    family: str  # timm's module, or torchvision's name without its size
    params: int | None  # None: the model could not be built on the meta device

    @property
    def library(self) -> str:
        return self.name.split("/")[0]


def names() -> dict[str, str]:
    """Every model's name and family, timm's, torchvision's, then the transformers sample's."""
    families = {f"timm/{name}": module for module in timm.list_modules()
                for name in timm.list_models(module=module)}
    for name in list_models(module=torchvision.models):
        families[f"torchvision/{name}"] = torchvision_family(name)
    for name in TRANSFORMERS_SAMPLE:
        families[name] = name.split("/")[1]
    return families


def describe(models: Iterable[str]) -> list[Model]:
    """The named models with their family and parameter count; ``KeyError`` for a name neither library has."""
    families = names()
    return [Model(name, families[name], _count(name)) for name in models]


def catalog(path: Path) -> list[Model]:
    """Every model with its parameter count, read from ``path`` or counted (and written there)."""
    if path.exists():
        with path.open() as file:
            return [Model(row["name"], row["family"], int(row["params"]) if row["params"] else None)
                    for row in csv.DictReader(file)]
    models = describe(tqdm(names(), desc="counting parameters"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "family", "params"])
        writer.writerows([m.name, m.family, "" if m.params is None else m.params] for m in models)
    return models


def _count(name: str) -> int | None:
    try:
        return parameter_count(name)
    except Exception:  # not buildable on the meta device: the sweep's build stage will say why
        return None


def select(models: list[Model], cap: float, sample: str | int | None = None) -> list[Model]:
    """The models with at most ``cap`` parameters (and those that could not be counted); with ``sample="families"``
    only the smallest of each family, with an integer ``sample`` that many drawn at random (seed 0)."""
    under = [m for m in models if m.params is None or m.params <= cap]
    if isinstance(sample, int):
        drawn = set(random.Random(0).sample(range(len(under)), min(sample, len(under))))
        return [m for i, m in enumerate(under) if i in drawn]
    if sample != "families":
        return under
    smallest: dict[tuple[str, str], Model] = {}
    for m in sorted(under, key=lambda m: (m.params is None, m.params or 0)):
        smallest.setdefault((m.library, m.family), m)
    return [m for m in under if smallest[m.library, m.family] is m]
