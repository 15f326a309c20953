"""Batched decoding with a KV cache: greedy or temperature/top-p sampling, stop strings, token streaming.

Prompts of different lengths are left-padded into one batch, so every row's next token sits in the last column
and one cached decoding step serves all rows; position ids follow the attention mask, so a padded row sees the
same positions as it would alone. Text-only and image prompts mix freely: the images of the batch are passed in
row order and the model's splice puts each into its placeholder run. The decoding loop is written out here
rather than delegated to `generate()` because the prompt goes in as spliced embeddings, answers must stop on
template strings (`<|im_end|>` is no token of a LLaMA vocabulary), and streaming needs the text step by step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from llava_lit.conversation import ChatTemplate
from llava_lit.inference.prompts import Prompt
from llava_lit.model import LlavaModel


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per answer."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples from the softmax of `logits / temperature`."""
    top_p: float = 1.0
    """Nucleus sampling: sample only among the most likely tokens whose probabilities sum to `top_p`."""
    stop: tuple[str, ...] = ()
    """Extra strings that end an answer (not included in it); the template's end-of-turn is always one."""
    seed: int | None = None
    """Seed for sampling; None uses the global torch generator."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.stop = tuple(self.stop)


@dataclass
class Completion:
    """One generated answer."""

    text: str
    """The answer only: no prompt, no stop string, stripped of surrounding whitespace."""
    token_ids: list[int]
    """Generated ids, up to and including the EOS or the token that completed a stop string."""
    prompt_tokens: int
    """Prompt length in tokens, image placeholders included."""
    finish_reason: str
    """`stop` (EOS or a stop string) or `length` (`max_new_tokens` reached)."""

    @property
    def completion_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.token_ids)


@dataclass(frozen=True)
class StreamDelta:
    """A piece of a streamed answer."""

    text: str
    """New answer text since the previous delta (may be empty on the last one)."""
    completion: Completion | None = None
    """Set on the last delta only: the whole answer with its token counts and finish reason."""


@dataclass
class _Row:
    """Decoding state of one batch row."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None


class Generator:
    """Generates answers for `Prompt`s with a `LlavaModel`.

    Args:
        model: the model, on its device, in eval mode.
        tokenizer: the tokenizer the prompts were built with.
        template: the chat template; its end-of-turn string stops every answer.
        max_length: the longest sequence (prompt + answer) the model may see; longer requests raise.
    """

    def __init__(
        self,
        model: LlavaModel,
        tokenizer: PreTrainedTokenizerBase,
        template: ChatTemplate,
        *,
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        eos = {tokenizer.eos_token_id}
        config_eos = getattr(model.language_model.generation_config, "eos_token_id", None)
        eos.update(config_eos if isinstance(config_eos, list) else [config_eos])
        self.eos_ids = sorted(int(t) for t in eos if t is not None)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0])
        # The end-of-turn string stops generation when it is not just the EOS token (plain's "\n", chatml's
        # "<|im_end|>"); EOS itself is caught by id, and skip_special_tokens hides it from the text.
        end = template.end_of_turn.replace(
            tokenizer.eos_token or "\0", ""
        ).strip() or template.end_of_turn.strip(" ")
        self.template_stops = (end,) if end else ()

    @property
    def device(self) -> torch.device:
        """Where the model's embeddings live (inputs are moved there)."""
        return self.model.language_model.get_input_embeddings().weight.device

    def check_length(self, prompt: Prompt, max_new_tokens: int) -> None:
        """Raise `ValueError` when the prompt plus `max_new_tokens` exceeds `max_length`."""
        if self.max_length is not None and len(prompt.input_ids) + max_new_tokens > self.max_length:
            raise ValueError(
                f"the prompt has {len(prompt.input_ids)} tokens (image placeholders included); with "
                f"max_new_tokens={max_new_tokens} that exceeds the model's maximum length of {self.max_length}"
            )

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, *, use_cache: bool = True
    ) -> list[Completion]:
        """Answer every prompt in one left-padded batch; returns one `Completion` per prompt, in order."""
        rows: list[_Row] = []
        for rows in self._decode(prompts, params, use_cache=use_cache):  # noqa: B007 - the last state is kept
            pass
        return [_completion(row) for row in rows]

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[StreamDelta]:
        """Yield the answer to one prompt in pieces as it is generated; the pieces join to `generate`'s text.

        Text that could still turn out to be the start of a stop string, trailing whitespace, and incomplete
        UTF-8 characters are held back until the following tokens settle them. The last delta carries the
        finished `Completion` (for usage counts and the finish reason).
        """
        stops = self.template_stops + params.stop
        sent = 0
        for (row,) in self._decode([prompt], params):
            done = row.finish_reason is not None or len(row.tokens) == params.max_new_tokens
            text = row.text.strip() if done else _settled_prefix(row.text.lstrip(), stops)
            piece = text[sent:] if len(text) > sent else ""
            sent = max(sent, len(text))
            if done:
                yield StreamDelta(piece, _completion(row))
                return
            if piece:
                yield StreamDelta(piece)

    @torch.inference_mode()
    def _decode(
        self, prompts: Sequence[Prompt], params: SamplingParams, *, use_cache: bool = True
    ) -> Iterator[list[_Row]]:
        """Run the decoding loop, yielding the rows' state after every step."""
        if not prompts:
            return
        for prompt in prompts:
            self.check_length(prompt, params.max_new_tokens)
        device = self.device
        stops = self.template_stops + params.stop
        width = max(len(p.input_ids) for p in prompts)
        batch = len(prompts)
        input_ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            n = len(prompt.input_ids)
            input_ids[i, width - n :] = torch.tensor(prompt.input_ids, dtype=torch.long)  # left padding
            attention_mask[i, width - n :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        images = [p.pixel_values for p in prompts if p.pixel_values is not None]
        pixel_values = torch.cat(images).to(device) if images else None  # [N, 3, H, W], row order
        sizes = [p.image_sizes for p in prompts if p.image_sizes is not None]
        image_sizes = torch.cat(sizes) if sizes else None  # [n_images, 2] (AnyRes)
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        eos = torch.tensor(self.eos_ids, device=device)
        rows = [_Row(prompt_tokens=len(p.input_ids)) for p in prompts]

        lm = self.model.language_model
        # Prefill: splice the images in, keep only the last position's logits (the full [B, L, V] is large).
        # Every forward here runs eagerly, also where training compiled the decoder layers
        # (`module.compile_blocks`): the KV cache's strides change at every step, and recompiling for them took
        # 32 s of the first 64 world sample answers on one CPU thread, until Dynamo's recompile limit; eager, 0.3 s.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
        with torch.compiler.set_stance("force_eager"):
            if use_cache:
                embeds = self.model.embed_inputs(input_ids, pixel_values, image_sizes)  # [B, L, D]
                out = lm(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = out.cache
            else:
                out = self.model(input_ids, attention_mask, pixel_values, image_sizes=image_sizes)
        logits = out.logits[:, -1]  # [B, V]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)

        for _ in range(params.max_new_tokens):
            next_tokens = _pick(logits, params, generator)  # [B]
            next_tokens = torch.where(finished, torch.full_like(next_tokens, self.pad_id), next_tokens)
            hit_eos = torch.isin(next_tokens, eos)
            for i, row in enumerate(rows):
                if row.finish_reason is not None:
                    continue
                token = int(next_tokens[i])
                row.tokens.append(token)
                row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
                cut = _first_stop(row.text, stops)
                if cut is not None:
                    row.text = row.text[:cut]
                if cut is not None or bool(hit_eos[i]):
                    row.finish_reason = "stop"
                    finished[i] = True
            yield rows
            if bool(finished.all()):
                return
            # One step: append the new tokens; finished rows keep decoding pad tokens that nobody reads.
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)  # [B, L + t]
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)[:, None]], dim=1)
            with torch.compiler.set_stance("force_eager"):
                if use_cache:
                    step_positions = attention_mask.sum(-1, keepdim=True) - 1  # [B, 1]
                    out = lm(
                        input_ids=next_tokens[:, None],
                        attention_mask=attention_mask,
                        position_ids=step_positions,
                        cache=cache,
                        use_cache=True,
                    )
                    cache = out.cache
                else:
                    out = self.model(input_ids, attention_mask, pixel_values, image_sizes=image_sizes)
            logits = out.logits[:, -1]


def _completion(row: _Row) -> Completion:
    return Completion(
        text=row.text.strip(),
        token_ids=row.tokens,
        prompt_tokens=row.prompt_tokens,
        finish_reason=row.finish_reason or "length",
    )


def _pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax, or a sample from the temperature-scaled, top-p-truncated distribution."""
    # logits: [B, V]
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / params.temperature, dim=-1)  # [B, V]
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens strictly more likely already cover top_p (the first always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _settled_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of an unfinished answer that no later token can change or cut."""
    text = text.rstrip("\ufffd")  # a byte-fallback character still missing its continuation bytes
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    text = text[: len(text) - hold]
    return text.rstrip()
