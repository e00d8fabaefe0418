"""The models a federation trains, all with one shape contract.

Every model built here

* carries ``model.input_shape`` (a tuple, no batch dimension) and
  ``model.num_classes``;
* splits into ``model.features(x)`` -- every layer but the last, flattened to
  ``[batch, k]`` -- and ``model.classifier``, the final :class:`torch.nn.Linear`,
  with ``forward(x) == classifier(features(x))``.

Forward passes use no in-place operations and no data-dependent Python control
flow, so ``features`` can be run batched over many parameter sets with
``torch.func.functional_call`` + ``torch.func.vmap`` (BatchNorm in eval mode
included). Parameter names are short and meaningful (``conv1.weight``,
``fc1.bias``, ``classifier.weight``...) because they become the layer names of
the flat update :class:`proto.layout.Layout`.

Initialisation follows PyTorch defaults; callers seed (``torch.manual_seed``)
before :func:`build_model` for reproducible weights.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "build_model", "batched_features", "stacked_state", "WorkloadModel", "LogReg", "MLP", "CNN", "ResNet18", "BasicBlock"]


def _shape(input_shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
    return shape


def _image_shape(input_shape, model: str) -> tuple[int, int, int]:
    shape = _shape(input_shape)
    if len(shape) != 3:
        raise ValueError(f"{model} needs an image input_shape (C, H, W), got {shape}")
    return shape  # type: ignore[return-value]


class WorkloadModel(nn.Module):
    """Base: ``forward(x) = classifier(features(x))``."""

    input_shape: tuple[int, ...]
    num_classes: int
    classifier: nn.Linear

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.input_shape = _shape(input_shape)
        self.num_classes = int(num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        """Width ``k`` of :meth:`features` (the classifier's input)."""
        return self.classifier.in_features

    def forward(self, x: torch.Tensor, features_only: bool = False) -> torch.Tensor:
        """Logits ``classifier(features(x))``; with ``features_only=True`` just ``features(x)``.

        The flag lets ``torch.func.functional_call(model, params, (x,), {"features_only": True})``
        reach the features with substituted weights (``functional_call`` only calls ``forward``).
        """
        z = self.features(x)
        return z if features_only else self.classifier(z)


class LogReg(WorkloadModel):
    """Multinomial logistic regression: flatten + Linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__(input_shape, num_classes)
        self.classifier = nn.Linear(math.prod(self.input_shape), self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class MLP(WorkloadModel):
    """flatten, Linear(in, hidden), ReLU, Linear(hidden, classes); hidden = 200."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 200):
        super().__init__(input_shape, num_classes)
        self.fc1 = nn.Linear(math.prod(self.input_shape), int(hidden))
        self.classifier = nn.Linear(int(hidden), self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(x.flatten(1)))


class CNN(WorkloadModel):
    """The 2-conv + 2-FC CNN of the Layerwise Cosine Aggregation experiments.

    conv 3x3 (32, padding 1) - ReLU - conv 3x3 (64, padding 1) - ReLU -
    maxpool 2x2 - flatten - FC(128) - ReLU - FC(classes).

    At 1x28x28 the first dense layer has 14*14*64*128 + 128 = 1,605,760
    parameters, the "1.6 million" the paper reports. Padding 1 keeps the
    spatial size through both convolutions, so the only shrink is the single
    2x2 pool: any input of at least 2x2 works (8x8 sklearn digits -> 4x4x64).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, int] = (32, 64),
                 hidden: int = 128):
        super().__init__(_image_shape(input_shape, "cnn"), num_classes)
        c, h, w = self.input_shape
        if h < 2 or w < 2:
            raise ValueError(f"cnn needs inputs of at least 2x2, got {self.input_shape}")
        c1, c2 = (int(v) for v in channels)
        self.conv1 = nn.Conv2d(c, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(c2 * (h // 2) * (w // 2), int(hidden))
        self.classifier = nn.Linear(int(hidden), self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(WorkloadModel):
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) with a CIFAR-style stem.

    Stem: 3x3 conv (stride 1) + BN + ReLU, no max-pool, so 28x28 / 32x32 inputs
    keep enough resolution; stages of 64/128/256/512 channels (strides
    1/2/2/2), global average pool, Linear(512, classes).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64):
        super().__init__(_image_shape(input_shape, "resnet18"), num_classes)
        c = self.input_shape[0]
        w = int(width)
        self.conv1 = nn.Conv2d(c, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        in_planes = w
        stages = []
        for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2))):
            blocks = []
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, w * mult, s))
                in_planes = w * mult
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.classifier = nn.Linear(in_planes, self.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


MODELS: dict[str, Callable[..., WorkloadModel]] = {
    "logreg": LogReg,
    "mlp": MLP,
    "cnn": CNN,
    "resnet18": ResNet18,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (no batch dim) and ``num_classes`` classes.

    ``kwargs`` go to the model: ``mlp(hidden=200)``, ``cnn(channels=(32, 64), hidden=128)``,
    ``resnet18(width=64)``.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return factory(tuple(input_shape), int(num_classes), **kwargs)


def stacked_state(layout, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of an ``[n, d]`` matrix of flat vectors as ``{name: [n, *shape]}`` (``layout`` is a
    :class:`proto.layout.Layout`); the input :func:`batched_features` takes."""
    if matrix.dim() != 2 or matrix.shape[1] != layout.d:
        raise ValueError(f"expected an [n, {layout.d}] matrix, got {tuple(matrix.shape)}")
    n = matrix.shape[0]
    return {layer.name: matrix[:, layer.slice].reshape(n, *layer.shape) for layer in layout}


def batched_features(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                     per_model_inputs: bool = False, chunk_size: int | None = None) -> torch.Tensor:
    """``model.features`` under each of ``n`` stacked parameter sets: ``[n, batch, k]``.

    ``params`` maps state_dict names to tensors with a leading ``n`` dimension
    (e.g. :func:`stacked_state`); names left out use the module's own tensors.
    ``x`` is one ``[batch, ...]`` input shared by all sets, or ``[n, batch, ...]``
    with ``per_model_inputs=True``. Run the model in eval mode (BatchNorm uses the
    substituted running statistics); gradients are not tracked.
    """
    from torch.func import functional_call, vmap

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi,), {"features_only": True}, strict=False)

    with torch.no_grad():
        return vmap(one, in_dims=(0, 0 if per_model_inputs else None), chunk_size=chunk_size)(params, x)
