"""llava_lit: train LLaVA-style vision-language models with PyTorch Lightning, Hydra and WebDataset."""

from llava_lit.cache import register_resolver

__version__ = "0.1.0"

register_resolver()
