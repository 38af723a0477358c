import os
import sys
from pathlib import Path

import pytest
import torch

from loram.tiny import TINY_BUILDERS

# `from tolerance import ...` (tests/tolerance.py) also under --import-mode=importlib, which does
# not put the test directory on sys.path.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

# One thread by default; LORAM_TEST_THREADS=N reruns the suite with N (the float tolerances are
# derived so that they hold whatever the thread count and BLAS blocking).
torch.set_num_threads(int(os.environ.get("LORAM_TEST_THREADS", "1")))


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_model(request):
    """Each tiny architecture in turn: Llama with GQA, Llama MHA, Qwen2 with q/k/v bias."""
    return TINY_BUILDERS[request.param]()
