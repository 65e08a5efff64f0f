import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Tests share two cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
