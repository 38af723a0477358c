"""LoRAM: train LoRA on a pruned model, recover it to the original shapes, merge, evaluate."""

__version__ = "0.1.0"
