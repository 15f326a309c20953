"""llava_lit: train LLaVA-style vision-language models with PyTorch Lightning, Hydra and WebDataset."""

__version__ = "0.1.0"
