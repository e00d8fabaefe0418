"""Checkpoints: everything needed to resume a run, written atomically.

Only tensors, numbers, strings and containers of them are saved, and they are
loaded with ``weights_only=True``: no arbitrary unpickling.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
