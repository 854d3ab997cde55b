import sys
from pathlib import Path

# tests/stats.py is a helper module shared by the statistical tests.
sys.path.insert(0, str(Path(__file__).parent))

import torch

# The estimator tests run thousands of tiny convolutions, where threads only add overhead
# (and CI has 2 cores shared with other work).
torch.set_num_threads(1)
