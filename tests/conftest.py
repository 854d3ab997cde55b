import itertools
import sys
from pathlib import Path

# tests/stats.py is a helper module shared by the statistical tests.
sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch

import xconv._layer
import xconv.batchnorm

# The estimator tests run thousands of tiny convolutions, where threads only add overhead
# (and CI has 2 cores shared with other work).
torch.set_num_threads(1)


@pytest.fixture
def fixed_seeds(monkeypatch):
    """Layers take seeds 17, 18, ... (restarted by calling the fixture's value): compiled code draws
    its seeds with torch.randint where eager code derives them from the generator's state
    (xconv.rng.draw_seed), so only fixed seeds compare the two."""
    counter = [itertools.count(17)]
    seed = lambda: torch.tensor(next(counter[0]), dtype=torch.int64)
    monkeypatch.setattr(xconv._layer, "draw_seed", seed)
    monkeypatch.setattr(xconv.batchnorm, "draw_seed", seed)
    return lambda: counter.__setitem__(0, itertools.count(17))
