"""What the property tests share: hypothesis budgets, the seed strategy and seeded float64 draws.

They are imported by name (``from conftest import FAST, seeds, orthonormal``): hypothesis needs them when a
test module is imported, before pytest could hand out a fixture.
"""

import torch
from hypothesis import settings
from hypothesis import strategies as st

F64 = torch.float64

#: Example budgets: FAST for checks that cost a few SVDs, THOROUGH for the cheap core properties.
FAST = settings(max_examples=40, deadline=None)
THOROUGH = settings(max_examples=100, deadline=None)

#: Seeds of the ``torch.Generator`` each example draws its tensors with, so examples replay exactly.
seeds = st.integers(0, 2**32 - 1)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def gaussian(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal float64 entries of ``shape``, drawn with ``gen``."""
    return torch.randn(*shape, generator=gen, dtype=F64)


def orthonormal(gen: torch.Generator, n: int, k: int) -> torch.Tensor:
    """``(n, k)`` float64 with orthonormal columns (``k <= n``): ``Q`` of a Gaussian matrix."""
    return torch.linalg.qr(gaussian(gen, n, k)).Q
