"""Constants shared by the data path and the model, kept in one place so the two can never disagree."""

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` skips: prompts, image positions, padding."""

IMAGE_TOKEN = "<image>"
"""Marker for an image in LLaVA records and in rendered prompts; also the tokenizer's added special token."""

DEFAULT_PAD_TOKEN = "<pad>"
"""Pad token added to tokenizers that have none (LLaMA/Vicuna ship without one)."""
