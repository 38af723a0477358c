"""Tiny models for tests: re-exported from :mod:`loram.tiny` (library code imports that)."""

from loram.tiny import *  # noqa: F403
from loram.tiny import TINY_BUILDERS, tiny_llama, tiny_llama_mha, tiny_pretrained, tiny_qwen2  # noqa: F401
