"""Chat templates: render LLaVA conversations to the exact text the model sees, plus the character spans it learns.

One renderer serves training and inference: training renders whole conversations and gets the answer spans;
inference renders the same turns with `add_generation_prompt=True` (or a trailing empty assistant turn) and
gets a prompt whose text is a prefix of the training text, so the two can never drift apart. Every piece of
template text (system prompt, role headers, separators, end-of-turn string) is a readable attribute, so the
HF chat-template exporter and the inference code read them instead of re-typing them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.records import ASSISTANT_ROLES, HUMAN_ROLES

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""LLaVA-1.5's training system prompt (`conv_vicuna_v1` in the official code)."""

LLAMA_2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
"""The system prompt of the official `llava_llama_2` template."""


_IMAGE_MARKER = re.compile(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*")


class ConversationError(ValueError):
    """Turns that no template can render (no answer, roles that do not alternate)."""


@dataclass(frozen=True)
class Rendered:
    """A rendered conversation."""

    text: str
    """The full text to tokenize (without BOS: the tokenizer adds it)."""
    target_spans: tuple[tuple[int, int], ...]
    """Character `[start, end)` spans of each assistant answer plus its end-of-turn string, in order; a span
    starts where an inference prompt ends (`ChatTemplate.generation_prompt`), so the assistant header's trailing
    space belongs to it."""


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format, as the pieces of text placed around each turn.

    Rendered text: `prefix`, then per round `user_prefix + question + user_suffix + assistant_prefix + answer +
    end_of_turn`, with `turn_separator` between an answer and the next question. The loss covers each answer
    and its `end_of_turn`.
    """

    name: str
    """Name used in configs (`data.template`)."""
    system: str
    """System prompt; empty for none."""
    system_format: str
    """How the system prompt is written, with `{system}`; placed at the very start unless `system_in_first_user`."""
    system_in_first_user: bool
    """Put the formatted system prompt inside the first user turn (LLaMA-2's `<<SYS>>` block)."""
    user_prefix: str
    """Text before each user turn (role header)."""
    user_suffix: str
    """Text after each user turn."""
    assistant_prefix: str
    """Text before each answer (role header). At inference the prompt ends with this, right-stripped of spaces."""
    end_of_turn: str
    """Text after each answer; trained on, so the model learns to stop (`</s>` for Vicuna, `\\n` for plain)."""
    turn_separator: str = ""
    """Text between an answer's `end_of_turn` and the next user turn (not trained on)."""
    drop_user_text: bool = False
    """Keep only the image markers of user turns (stage-1 `plain`: the caption is learned from the image alone)."""

    @property
    def generation_prompt(self) -> str:
        """What ends an inference prompt: the assistant header without its trailing space.

        The space belongs to the first answer token in SentencePiece vocabularies (`▁The`), so the training
        text tokenizes to the inference prompt's ids followed by the answer's ids.
        """
        return self.assistant_prefix.rstrip(" ")

    def render(self, turns: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> Rendered:
        """Render `turns` (LLaVA `{"from", "value"}` or `{"role", "content"}` dicts) to text and target spans.

        Leading assistant turns are dropped (as LLaVA does); the rest must alternate user/assistant. A final
        empty assistant turn, or `add_generation_prompt=True` after a user turn, renders the inference prompt.
        User turns get their image markers moved to the front (`place_image_markers`), in training and at
        inference alike.
        """
        pairs = _as_role_pairs(turns)
        while pairs and pairs[0][0] == "assistant":
            pairs.pop(0)
        if pairs and pairs[-1] == ("assistant", ""):
            pairs.pop()
            add_generation_prompt = True
        if not pairs:
            raise ConversationError("no user turn")
        for i, (role, _) in enumerate(pairs):
            if role != ("user" if i % 2 == 0 else "assistant"):
                raise ConversationError(f"turn {i} is from {role}: roles must alternate user/assistant")
        if add_generation_prompt and pairs[-1][0] != "user":
            raise ConversationError("a generation prompt must follow a user turn")

        system = self.system_format.format(system=self.system) if self.system else ""
        parts: list[str] = [] if self.system_in_first_user else [system]
        spans: list[tuple[int, int]] = []
        length = len(parts[0]) if parts else 0

        def add(piece: str) -> None:
            nonlocal length
            parts.append(piece)
            length += len(piece)

        for i, (role, text) in enumerate(pairs):
            if role == "user":
                if i > 0:
                    add(self.turn_separator)
                if self.drop_user_text:
                    text = IMAGE_TOKEN * text.count(IMAGE_TOKEN)
                else:
                    text = place_image_markers(text)
                if i == 0 and self.system_in_first_user:
                    text = system + text
                add(self.user_prefix + text + self.user_suffix)
            else:
                # The span starts where the inference prompt ends (`generation_prompt`), so it holds the header's
                # trailing space: the official masks learn the token that carries it (a lone `▁` before an answer
                # starting with a digit, `▁The` otherwise).
                start = length + len(self.generation_prompt)
                add(self.assistant_prefix)
                add(text + self.end_of_turn)
                spans.append((start, length))
        if add_generation_prompt:
            add(self.generation_prompt)
        return Rendered(text="".join(parts), target_spans=tuple(spans))


def place_image_markers(text: str) -> str:
    """Move every `<image>` of a user turn to its front, one `<image>\\n` per image (LLaVA's placement).

    LLaVA strips the marker and prepends `<image>\\n`; keeping one marker per image extends that to several
    images per turn. Text without markers is returned unchanged.
    """
    count = text.count(IMAGE_TOKEN)
    if not count:
        return text
    return (IMAGE_TOKEN + "\n") * count + _IMAGE_MARKER.sub(" ", text).strip()


def _as_role_pairs(turns: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Map LLaVA (`from`/`value`) or chat (`role`/`content`) turns to `(user|assistant, text)` pairs."""
    pairs = []
    for turn in turns:
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise ConversationError(f"turn without text: {turn!r:.80}")
        if role in HUMAN_ROLES:
            pairs.append(("user", text))
        elif role in ASSISTANT_ROLES:
            pairs.append(("assistant", text))
        else:
            raise ConversationError(f"unknown role {role!r}")
    return pairs


PLAIN = ChatTemplate(
    name="plain",
    system="",
    system_format="{system}",
    system_in_first_user=False,
    user_prefix="",
    user_suffix="",
    assistant_prefix="",
    end_of_turn="\n",
    drop_user_text=True,
)
"""Stage 1 (feature alignment): `<image>` + caption + `\\n`; the instruction text is dropped."""

VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    system=VICUNA_SYSTEM,
    system_format="{system} ",
    system_in_first_user=False,
    user_prefix="USER: ",
    user_suffix=" ",
    assistant_prefix="ASSISTANT: ",
    end_of_turn="</s>",
)
"""LLaVA-1.5 stage 2: `{system} USER: <image>\\n{q} ASSISTANT: {a}</s>USER: ...`."""

LLAMA_2 = ChatTemplate(
    name="llama_2",
    system=LLAMA_2_SYSTEM,
    system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
    system_in_first_user=True,
    user_prefix="[INST] ",
    user_suffix=" [/INST]",
    assistant_prefix=" ",
    end_of_turn=" </s>",
    turn_separator="<s>",
)
"""LLaMA-2-chat: `[INST] <<SYS>>\\n{sys}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...` (BOS from the tokenizer)."""

CHATML = ChatTemplate(
    name="chatml",
    system="You are a helpful assistant.",
    system_format="<|im_start|>system\n{system}<|im_end|>\n",
    system_in_first_user=False,
    user_prefix="<|im_start|>user\n",
    user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    end_of_turn="<|im_end|>\n",
)
"""ChatML as LLaVA-NeXT's Qwen models use it (`conv_qwen`): `<|im_start|>role\\n...<|im_end|>\\n` blocks."""

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (PLAIN, VICUNA_V1, LLAMA_2, CHATML)}
"""The templates by config name."""


def get_template(name: str, system: str | None = None) -> ChatTemplate:
    """The template called `name` (`plain`, `vicuna_v1`, `llama_2`, `chatml`).

    `system` replaces its system prompt (`""` for none); None keeps the template's own.
    """
    if name not in TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    template = TEMPLATES[name]
    return template if system is None or system == template.system else replace(template, system=system)
