"""Shared fixtures for the defense tests: a tiny model with a BatchNorm layer
(so the layout has buffers), its layout, round contexts, and honest/outlier data."""
from __future__ import annotations

import torch
from torch import nn

from orchestrator.defenses import RoundContext
from proto.layout import Layout


class Tiny(nn.Module):
    """Linear(6, 8) - BatchNorm1d - ReLU as features, Linear(8, 3) as classifier."""

    input_shape = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.classifier = nn.Linear(8, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinySeq(nn.Sequential):
    """A model without ``features``: the plugin uses all children but the last."""

    input_shape = (6,)

    def __init__(self) -> None:
        super().__init__(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


MODEL = tiny_model()
LAYOUT = Layout.from_module(MODEL)
GLOBAL = LAYOUT.flatten(MODEL.state_dict()).to(torch.float64)
ONE_LAYER = Layout.from_shapes([("w", (40,))])


def model_fn() -> Tiny:
    return tiny_model()


def context(f: int = 3, layout: Layout = LAYOUT, state: dict | None = None, seed: int = 1,
            dtype: torch.dtype = torch.float64, n: int | None = None, device: str = "cpu") -> RoundContext:
    gw = GLOBAL if layout is LAYOUT else torch.zeros(layout.d, dtype=dtype)
    counts = None if n is None else torch.arange(1, n + 1, dtype=torch.float32) * 10
    return RoundContext(layout=layout, global_weights=gw.to(device, dtype), round=1, f=f,
                        generator=torch.Generator().manual_seed(seed), state={} if state is None else state,
                        model_fn=model_fn, sample_counts=counts)


def honest(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float64, spread: float = 0.05):
    """``n`` rows around a common mean ``mu`` (entries ~ 0.1 N(0, 1)); returns (rows, mu)."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.1 * torch.randn(d, generator=g, dtype=dtype)
    return mu + spread * torch.randn(n, d, generator=g, dtype=dtype), mu


def with_outliers(rows: torch.Tensor, f: int, norm: float = 1e6, seed: int = 7) -> torch.Tensor:
    """``rows`` with the first ``f`` replaced by random directions of norm ``norm``."""
    g = torch.Generator().manual_seed(seed)
    out = rows.clone()
    bad = torch.randn(f, rows.shape[1], generator=g, dtype=rows.dtype)
    out[:f] = norm * bad / bad.norm(dim=1, keepdim=True)
    return out
