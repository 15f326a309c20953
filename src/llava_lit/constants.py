"""Constants shared by the data path and the model, kept in one place so the two can never disagree."""

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` skips: prompts, image positions, padding."""

IMAGE_TOKEN = "<image>"
"""Marker for an image in LLaVA records and in rendered prompts; also the tokenizer's added special token."""

DEFAULT_PAD_TOKEN = "<pad>"
"""Pad token added to tokenizers that have none (LLaMA/Vicuna ship without one)."""

STEP_TOKENS_KEY = "step_supervised_tokens"
"""Batch key the training loader adds: the supervised (shifted) tokens of the micro-batch's whole optimizer step
on this rank, a 0-dim integer tensor; the module sums it over ranks and normalises the loss by it."""
