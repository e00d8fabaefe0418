"""label_flip and targeted_flip against their definitions."""
from __future__ import annotations

import pytest
import torch

from attacks import build_attack


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data(n: int = 200, classes: int = 10):
    x = torch.randn(n, 3, generator=gen(7))
    y = torch.randint(0, classes, (n,), generator=gen(8))
    return x, y


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_label_flip_changes_exactly_the_fraction_and_never_to_itself(fraction):
    x, y = data()
    x2, y2 = build_attack("label_flip", {"fraction": fraction}).poison(x, y, 10, gen(1))
    assert x2 is x
    assert y2.shape == y.shape and y2.dtype == y.dtype
    assert int((y2 != y).sum()) == round(fraction * len(y))  # a chosen label always changes
    assert int(y2.min()) >= 0 and int(y2.max()) < 10


def test_label_flip_leaves_input_untouched_and_is_seeded():
    x, y = data()
    y_copy = y.clone()
    attack = build_attack("label_flip", {"fraction": 0.5})
    _, a = attack.poison(x, y, 10, gen(1))
    _, b = attack.poison(x, y, 10, gen(1))
    _, c = attack.poison(x, y, 10, gen(2))
    assert torch.equal(y, y_copy)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_label_flip_uses_every_other_class():
    y = torch.zeros(3000, dtype=torch.long)
    _, y2 = build_attack("label_flip", {}).poison(torch.zeros(3000, 1), y, 4, gen(3))
    assert set(y2.tolist()) == {1, 2, 3}


def test_label_flip_two_classes_is_a_swap():
    y = torch.tensor([0, 1, 0, 1])
    _, y2 = build_attack("label_flip", {"fraction": 1.0}).poison(torch.zeros(4, 1), y, 2, gen())
    assert torch.equal(y2, 1 - y)


def test_label_flip_rejects_bad_inputs():
    attack = build_attack("label_flip", {})
    with pytest.raises(ValueError, match="num_classes"):
        attack.poison(torch.zeros(2, 1), torch.tensor([0, 0]), 1, gen())
    with pytest.raises(ValueError, match="num_classes"):
        attack.poison(torch.zeros(2, 1), torch.tensor([0, 5]), 3, gen())


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_targeted_flip_only_touches_the_source_class(fraction):
    x, y = data()
    _, y2 = build_attack("targeted_flip", {"source": 3, "target": 5, "fraction": fraction}).poison(x, y, 10, gen(4))
    changed = y2 != y
    assert bool((y[changed] == 3).all()) and bool((y2[changed] == 5).all())
    assert int(changed.sum()) == round(fraction * int((y == 3).sum()))


def test_targeted_flip_validation():
    with pytest.raises(ValueError, match="target"):
        build_attack("targeted_flip", {"source": 2, "target": 2})
    with pytest.raises(ValueError, match="source"):
        build_attack("targeted_flip", {"source": 12, "target": 1}).poison(torch.zeros(1, 1), torch.tensor([0]), 10, gen())
