"""Our chat templates written as Hugging Face Jinja chat templates, so `apply_chat_template` renders our text.

The Jinja is generated from the `ChatTemplate` fields (system prompt, role headers, separators, end-of-turn), never
typed by hand, so it cannot drift from the template the model was trained with. It also reproduces the data
pipeline's image placement (`conversation.place_image_markers`): every image of a user turn becomes one
`<image>\\n` at the front of the turn, whether the turn's content is a string with `<image>` markers or a list of
`{"type": "image"}` / `{"type": "text"}` parts. BOS is not part of the template: the tokenizer adds it, exactly
as in training.
"""

from __future__ import annotations

import json
import re

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.conversation import ChatTemplate

_SYSTEM_PREFIX = "{%- set ns = namespace(system="
"""How `to_jinja` opens every template: the default system prompt follows as a JSON string literal."""
_SYSTEM_LITERAL = re.compile(re.escape(_SYSTEM_PREFIX) + r'("(?:[^"\\]|\\.)*"),')


def _lit(text: str) -> str:
    """A Jinja string literal for `text` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(text)


def to_jinja(template: ChatTemplate) -> str:
    """The Jinja chat template that renders `messages` exactly as `template.render` does.

    A leading `system` message replaces the template's system prompt; leading assistant messages are dropped and
    roles must then alternate user/assistant (raised through `raise_exception`, as transformers templates do).
    """
    image = _lit(IMAGE_TOKEN)
    # Per user message: count images and collect text. String content: split on the marker, strip the pieces,
    # join the non-empty ones with a space (what `place_image_markers`' regex substitution produces).
    return "".join(
        [
            _SYSTEM_PREFIX + _lit(template.system) + ", started=false, prompted=false, n=0) -%}",
            "{%- set msgs = messages -%}",
            "{%- if msgs and msgs[0]['role'] == 'system' -%}",
            "{%- if msgs[0]['content'] is string -%}{%- set ns.system = msgs[0]['content'] -%}",
            "{%- else -%}{%- set ns.system = msgs[0]['content'] | selectattr('type', 'equalto', 'text')"
            " | map(attribute='text') | join(' ') -%}{%- endif -%}",
            "{%- set msgs = msgs[1:] -%}",
            "{%- endif -%}",
            "{%- set ns.sys_text = '' -%}",
            "{%- if ns.system -%}{%- set ns.sys_text = "
            + _lit(template.system_format)
            + ".replace('{system}', "
            "ns.system) -%}{%- endif -%}",
            "" if template.system_in_first_user else "{{- ns.sys_text -}}",
            "{%- for message in msgs -%}",
            "{%- if message['role'] == 'assistant' and not ns.started -%}",
            "{%- else -%}",
            "{%- set ns.started = true -%}",
            "{%- set expected = 'user' if ns.n % 2 == 0 else 'assistant' -%}",
            "{%- if message['role'] != expected -%}",
            "{{- raise_exception('Conversation roles must alternate user/assistant after an optional system "
            "message') -}}",
            "{%- endif -%}",
            "{%- if message['role'] == 'user' -%}",
            "{%- set ns.images = 0 -%}{%- set ns.text = [] -%}{%- set ns.raw = [] -%}",
            "{%- if message['content'] is string -%}",
            "{%- set pieces = message['content'].split(" + image + ") -%}",
            "{%- set ns.images = pieces | length - 1 -%}",
            "{%- set ns.text = pieces | map('trim') | select | list -%}",
            "{%- set ns.raw = [message['content']] -%}",
            "{%- else -%}",
            "{%- for part in message['content'] -%}",
            "{%- if part['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}",
            "{%- elif part['type'] == 'text' -%}",
            "{%- set pieces = part['text'].split(" + image + ") -%}",
            "{%- set ns.images = ns.images + pieces | length - 1 -%}",
            "{%- set ns.text = ns.text + (pieces | map('trim') | select | list) -%}",
            "{%- set ns.raw = ns.raw + [part['text']] -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- endif -%}",
            # Without images the turn's text is kept as is; with images they move to the front, one per line.
            "{%- if ns.images > 0 -%}",
            "{%- set body = (" + _lit(IMAGE_TOKEN + "\n") + " * ns.images) + (ns.text | join(' ')) -%}",
            "{%- else -%}{%- set body = ns.raw | join(' ') -%}{%- endif -%}",
            ("{%- set body = " + image + " * ns.images -%}" if template.drop_user_text else ""),
            "{%- if ns.n > 0 -%}{{- " + _lit(template.turn_separator) + " -}}{%- endif -%}",
            (
                "{%- if ns.n == 0 -%}{%- set body = ns.sys_text + body -%}{%- endif -%}"
                if template.system_in_first_user
                else ""
            ),
            "{{- " + _lit(template.user_prefix) + " + body + " + _lit(template.user_suffix) + " -}}",
            "{%- else -%}",
            "{%- set answer = message['content'] if message['content'] is string else (message['content']"
            " | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) -%}",
            # A final empty assistant message asks for a reply, as in `ChatTemplate.render`.
            "{%- if loop.last and answer == '' -%}{%- set ns.prompted = true -%}",
            "{{- " + _lit(template.generation_prompt) + " -}}",
            "{%- else -%}",
            "{{- " + _lit(template.assistant_prefix) + " + answer + " + _lit(template.end_of_turn) + " -}}",
            "{%- endif -%}",
            "{%- endif -%}",
            "{%- set ns.n = ns.n + 1 -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt and not ns.prompted -%}{{- "
            + _lit(template.generation_prompt)
            + " -}}{%- endif -%}",
        ]
    )


def system_prompt_of(jinja: str) -> str | None:
    """The default system prompt a `to_jinja` template was written with; None for Jinja `to_jinja` did not write."""
    match = _SYSTEM_LITERAL.match(jinja)
    return json.loads(match.group(1)) if match else None
