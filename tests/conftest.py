import pytest
import torch

from loram.testing import TINY_BUILDERS

torch.set_num_threads(1)


@pytest.fixture(params=sorted(TINY_BUILDERS))
def tiny_model(request):
    """Each tiny architecture in turn: Llama with GQA, Llama MHA, Qwen2 with q/k/v bias."""
    return TINY_BUILDERS[request.param]()
