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


def pytest_terminal_summary(terminalreporter):
    """The saved-bytes table of tests/test_xconv_thirdparty.py's models, from the properties each test
    records: read from the test reports, it is printed under pytest-xdist too (whose workers write
    nothing to the terminal)."""
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        recorded = dict(report.user_properties)
        if report.when == "call" and "saved_bytes_ratio" in recorded:
            name = report.nodeid.partition("[")[2].rstrip("]")
            rows.append((name, recorded["saved_bytes_ratio"], recorded["unconvertible_share"]))
    if rows:
        terminalreporter.write_line("")
        terminalreporter.write_line("saved-for-backward bytes, xconv.convert(model) / torch (train forward + loss), "
                                    "and the share of the converted model's in modules and ops convert has no layer for:")
        for name, ratio, unconvertible in sorted(rows):
            terminalreporter.write_line(f"  {name:<24} {ratio:6.3f}x   unconvertible {unconvertible:6.1%}")
