"""Inference prompts, built by the same template and tokenizer code that built the training masks.

A prompt is the conversation so far rendered with `add_generation_prompt=True`, so its text ends where the
assistant's answer begins, tokenized as training tokenizes (`tokenization.tokenize_with_images`, the official
`tokenizer_image_token`): for an official LLaVA-1.5 checkpoint it is the `model_vqa_loader` /
`model_vqa_science` prompt token for token. The template places image markers as in training, and each one is
expanded into the vision tower's `num_image_tokens` placeholders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.conversation import ChatTemplate, ConversationError
from llava_lit.tokenization import SkipSample, check_image_markers, image_token_id, tokenize_with_images


class PromptError(ValueError):
    """A conversation that cannot become a prompt (bad roles, image count mismatch, answer holding an image)."""


@dataclass(frozen=True)
class Prompt:
    """One prepared generation request."""

    input_ids: list[int]
    """Token ids with every image run expanded, BOS included, ending at the assistant's header."""
    pixel_values: torch.Tensor | None
    """Tensor[n_images, 3, H, W] in the order of the image runs (AnyRes: every image's tiles, image after
    image), or None for a text-only prompt."""
    image_sizes: torch.Tensor | None = None
    """LongTensor[n_images, 2], each image's (height, width), for an AnyRes model; None otherwise."""

    @property
    def num_images(self) -> int:
        """Images in this prompt."""
        if self.image_sizes is not None:
            return int(self.image_sizes.shape[0])
        return 0 if self.pixel_values is None else int(self.pixel_values.shape[0])


def render_prompt_text(turns: Sequence[Mapping[str, str]], template: ChatTemplate) -> str:
    """The prompt text (before tokenization) for `turns`, which must end with a user turn."""
    try:
        check_image_markers(turns)
        return template.render(turns, add_generation_prompt=True).text
    except (ConversationError, SkipSample) as err:
        raise PromptError(str(err)) from err


def build_prompt(
    turns: Sequence[Mapping[str, str]],
    *,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    num_image_tokens: int | Sequence[int],
    pixel_values: torch.Tensor | None = None,
    image_sizes: torch.Tensor | None = None,
) -> Prompt:
    """Render, tokenize (BOS added as in training) and expand `turns` into a `Prompt`.

    `turns` are LLaVA (`from`/`value`) or chat (`role`/`content`) dicts ending with a user turn; each image is
    an `<image>` marker in a user turn, matched in order with `pixel_values` ([n, 3, H, W]). With AnyRes,
    `image_sizes` ([n, 2]) gives the images and `num_image_tokens` one count per image.
    """
    text = render_prompt_text(turns, template)
    ids, _ = tokenize_with_images(text, tokenizer)
    img_id = image_token_id(tokenizer)
    found = sum(1 for token in ids if token == img_id)
    if image_sizes is not None:
        expected = int(image_sizes.shape[0])
    else:
        expected = 0 if pixel_values is None else int(pixel_values.shape[0])
    if found != expected:
        raise PromptError(f"the conversation has {found} <image> markers but {expected} images were given")
    counts = iter([num_image_tokens] * found if isinstance(num_image_tokens, int) else num_image_tokens)
    expanded: list[int] = []
    for token in ids:
        expanded.extend([token] * next(counts) if token == img_id else [token])
    return Prompt(input_ids=expanded, pixel_values=pixel_values, image_sizes=image_sizes)
