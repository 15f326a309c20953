"""The exported Jinja chat template renders exactly what our templates render, on multi-turn conversations."""

from __future__ import annotations

import copy

import pytest

from llava_lit.conversation import TEMPLATES, get_template
from llava_lit.interop.chat_template import system_prompt_of, to_jinja
from llava_lit.interop.import_hf import _recorded_template

CONVERSATIONS = [
    # string contents with the marker in the middle, extra spaces, three rounds, ends with an answer
    [
        {"role": "user", "content": "What is in <image> this picture?"},
        {"role": "assistant", "content": "A red disc on a gradient."},
        {"role": "user", "content": "  Which colour dominates? "},
        {"role": "assistant", "content": "Green, towards the bottom."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You're welcome."},
    ],
    # the marker first with a newline, ends with a question (generation prompt)
    [
        {"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": "A disc."},
        {"role": "user", "content": "Where is it?"},
    ],
    # list contents: image parts before or after the text, two images in one turn
    [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "They match."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ],
    # a leading assistant turn is dropped, as in training
    [
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "<image> What shape?"},
        {"role": "assistant", "content": "Round."},
    ],
]


def _as_llava_turns(messages: list[dict]) -> list[dict]:
    """The same conversation in the form the data pipeline reads (`<image>` markers in strings)."""
    turns = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            images = sum(1 for part in content if part["type"] == "image")
            text = " ".join(part["text"] for part in content if part["type"] == "text")
            content = "<image>" * images + text
        turns.append({"role": message["role"], "content": content})
    return turns


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_jinja_renders_training_text(name: str, index: int, llama_tokenizer) -> None:
    template = TEMPLATES[name]
    messages = CONVERSATIONS[index]
    generation = messages[-1]["role"] == "user"
    expected = template.render(_as_llava_turns(messages), add_generation_prompt=generation).text
    tokenizer = copy.copy(llama_tokenizer)
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=to_jinja(template), tokenize=False, add_generation_prompt=generation
    )
    assert rendered == expected


def test_system_message_replaces_default(llama_tokenizer) -> None:
    template = TEMPLATES["vicuna_v1"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = llama_tokenizer.apply_chat_template(
        messages, chat_template=to_jinja(template), tokenize=False, add_generation_prompt=True
    )
    assert rendered == "Be brief. USER: Hi ASSISTANT:"


def test_roles_must_alternate(llama_tokenizer) -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        llama_tokenizer.apply_chat_template(
            messages, chat_template=to_jinja(TEMPLATES["vicuna_v1"]), tokenize=False
        )


@pytest.mark.parametrize(
    ("name", "system"),
    [("vicuna_v1", ""), ("vicuna_v1", 'Say "yes" \\ no.'), ("llama_2", "Be brief."), ("chatml", "")],
)
def test_replaced_system_prompt_renders_and_is_recognised(name: str, system: str, llama_tokenizer) -> None:
    """A run trained with `data.system_prompt` exports a Jinja that renders it and that import reads back."""
    template = get_template(name, system=system)
    messages = CONVERSATIONS[1]
    expected = template.render(_as_llava_turns(messages), add_generation_prompt=True).text
    tokenizer = copy.copy(llama_tokenizer)
    jinja = to_jinja(template)
    rendered = tokenizer.apply_chat_template(
        messages, chat_template=jinja, tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected
    assert system_prompt_of(jinja) == system
    assert system_prompt_of("{{ messages }}") is None
    tokenizer.chat_template = jinja
    assert _recorded_template(tokenizer) == (name, system)
    tokenizer.chat_template = to_jinja(TEMPLATES[name])
    assert _recorded_template(tokenizer) == (name, None)  # the template's own prompt
    tokenizer.chat_template = "{{ messages }}"
    assert _recorded_template(tokenizer) == (None, None)  # not one of our exports
