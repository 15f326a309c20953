"""Label masks on the real 32k LLaMA tokenizer: exactly the answers (+ end of turn) are learned, nothing else."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llava_lit.constants import IGNORE_INDEX
from llava_lit.conversation import VICUNA_SYSTEM, get_template
from llava_lit.tokenization import SkipSample, encode_conversation, image_token_id

N_IMG = 576

TWO_ROUNDS = [
    {"from": "human", "value": "What is in this picture?\n<image>"},
    {"from": "gpt", "value": "A ginger cat sits on a wooden table."},
    {"from": "human", "value": "What colour is the table?"},
    {"from": "gpt", "value": "The table is dark brown, with a café ✓ sticker."},
]


def encode(tokenizer, conversations, template, *, num_images=1, max_length=4096, num_image_tokens=N_IMG):
    return encode_conversation(
        conversations,
        tokenizer=tokenizer,
        template=template,
        num_image_tokens=num_image_tokens,
        max_length=max_length,
        num_images=num_images,
    )


def label_spans(labels: torch.Tensor) -> list[list[int]]:
    """The unmasked label runs, as lists of token ids."""
    spans, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(value)
    return spans + ([current] if current else [])


def test_vicuna_labels_are_exactly_the_answers_with_eos(llama_tokenizer):
    sample = encode(llama_tokenizer, TWO_ROUNDS, "vicuna_v1")
    spans = label_spans(sample.labels)
    assert len(spans) == 2  # one unmasked span per answer
    decoded = [llama_tokenizer.decode(s) for s in spans]
    assert decoded == [TWO_ROUNDS[1]["value"] + "</s>", TWO_ROUNDS[3]["value"] + "</s>"]
    assert all(s[-1] == llama_tokenizer.eos_token_id for s in spans)
    # Every label is either the input id or ignored (no shift in the data path).
    trained = sample.labels != IGNORE_INDEX
    assert torch.equal(sample.labels[trained], sample.input_ids[trained])
    assert trained.sum() == sum(len(s) for s in spans)


def test_vicuna_prompt_matches_the_official_string_and_masks_everything_else(llama_tokenizer):
    template = get_template("vicuna_v1")
    rendered = template.render(TWO_ROUNDS[:2])
    assert rendered.text == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is in this picture? ASSISTANT: A ginger cat sits on a wooden table.</s>"
    )
    sample = encode(llama_tokenizer, TWO_ROUNDS, "vicuna_v1")
    img = image_token_id(llama_tokenizer)
    ids, labels = sample.input_ids, sample.labels
    assert ids[0] == llama_tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    image_positions = (ids == img).nonzero().flatten()
    assert len(image_positions) == N_IMG
    assert image_positions[-1] - image_positions[0] == N_IMG - 1  # one contiguous run
    assert (labels[ids == img] == IGNORE_INDEX).all()
    # The masked text holds the system prompt, both user turns and all role headers.
    masked_text = llama_tokenizer.decode(ids[(labels == IGNORE_INDEX) & (ids != img)])
    for piece in (VICUNA_SYSTEM, "USER: ", "What colour is the table?", "ASSISTANT:"):
        assert piece in masked_text
    assert "ginger" not in masked_text and "dark brown" not in masked_text


def test_inference_prompt_ids_are_the_training_prefix(llama_tokenizer):
    """The ids the model is trained on start with exactly the ids it is given at inference."""
    img = image_token_id(llama_tokenizer)
    for name in ("vicuna_v1", "llama_2", "chatml", "plain"):
        template = get_template(name)
        conv = TWO_ROUNDS[:2]
        prompt = template.render([*conv[:1], {"from": "gpt", "value": ""}]).text
        assert prompt == template.render(conv[:1], add_generation_prompt=True).text
        if name == "vicuna_v1":
            assert prompt.endswith("ASSISTANT:")
        prompt_ids = llama_tokenizer(prompt)["input_ids"]
        # Expand the image id the way encode_conversation does, then compare with the training ids.
        expanded = [t for i in prompt_ids for t in ([img] * N_IMG if i == img else [i])]
        sample = encode(llama_tokenizer, conv, name)
        assert sample.input_ids[: len(expanded)].tolist() == expanded, name
        first_label = int((sample.labels != IGNORE_INDEX).nonzero()[0])
        assert first_label == len(expanded), name  # learning starts right after the prompt


def test_plain_learns_caption_and_newline_only(llama_tokenizer):
    conv = [
        {"from": "human", "value": "Render a short caption of the picture.\n<image>"},
        {"from": "gpt", "value": "the cat sat on the mat"},
    ]
    sample = encode(llama_tokenizer, conv, "plain")
    img = image_token_id(llama_tokenizer)
    ids = sample.input_ids.tolist()
    assert ids[0] == llama_tokenizer.bos_token_id
    assert ids[1 : 1 + N_IMG] == [img] * N_IMG
    text = llama_tokenizer.decode([i for i in ids if i != img], skip_special_tokens=False)
    assert "Render" not in text  # the instruction is dropped
    spans = label_spans(sample.labels)
    assert len(spans) == 1
    assert llama_tokenizer.decode(spans[0]) == "the cat sat on the mat\n"
    assert spans[0][-1] == llama_tokenizer.convert_tokens_to_ids("<0x0A>")
    assert sample.labels[: 1 + N_IMG].eq(IGNORE_INDEX).all()
    assert llama_tokenizer.eos_token_id not in ids  # plain appends no EOS


@pytest.mark.parametrize("name", ["llama_2", "chatml"])
def test_other_templates_give_one_span_per_answer(llama_tokenizer, name):
    template = get_template(name)
    sample = encode(llama_tokenizer, TWO_ROUNDS, name)
    decoded = [llama_tokenizer.decode(s).strip() for s in label_spans(sample.labels)]
    eot = template.end_of_turn.strip()
    assert decoded == [
        f"{TWO_ROUNDS[1]['value']}{template.end_of_turn}".strip(),
        f"{TWO_ROUNDS[3]['value']}{template.end_of_turn}".strip(),
    ]
    assert all(d.endswith(eot) for d in decoded)


def test_llama_2_renders_the_official_layout():
    text = get_template("llama_2").render(TWO_ROUNDS).text
    assert text.startswith("[INST] <<SYS>>\n")
    assert (
        "\n<</SYS>>\n\n<image>\nWhat is in this picture? [/INST] A ginger cat sits on a wooden table. </s>"
        in text
    )
    assert "</s><s>[INST] What colour is the table? [/INST] The table" in text


def test_image_marker_moves_to_the_front_and_several_images_work(llama_tokenizer):
    conv = [
        {"from": "human", "value": "Compare <image> with\n<image> please."},
        {"from": "gpt", "value": "The first is brighter."},
    ]
    sample = encode(llama_tokenizer, conv, "vicuna_v1", num_images=2, num_image_tokens=4)
    img = image_token_id(llama_tokenizer)
    assert (sample.input_ids == img).sum() == 8
    text = (
        get_template("vicuna_v1")
        .render([{"from": "human", "value": "<image>\n<image>\nCompare with please."}, conv[1]])
        .text
    )
    assert "USER: <image>\n<image>\nCompare with please. ASSISTANT:" in text


def test_leading_assistant_turn_is_dropped(llama_tokenizer):
    conv = [{"from": "gpt", "value": "Hello!"}, *TWO_ROUNDS[:2]]
    sample = encode(llama_tokenizer, conv, "vicuna_v1")
    assert len(label_spans(sample.labels)) == 1


def test_unmaskable_sample_is_skipped_with_a_reason(llama_tokenizer):
    # A header that ends inside the first word of the answer: "th" + "e cat" tokenizes as "▁the", a token
    # that belongs to both the prompt and the answer. No correct mask exists, so the sample is skipped.
    broken = dataclasses.replace(get_template("vicuna_v1"), assistant_prefix="ASSISTANT: th")
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "e cat"}]
    with pytest.raises(SkipSample) as err:
        encode(llama_tokenizer, conv, broken)
    assert err.value.reason == "target_misaligned"


@pytest.mark.parametrize(
    ("conv", "num_images", "max_length", "reason"),
    [
        (TWO_ROUNDS, 2, 4096, "image_count_mismatch"),
        (TWO_ROUNDS, 0, 4096, "image_count_mismatch"),
        ([TWO_ROUNDS[0], TWO_ROUNDS[0], TWO_ROUNDS[1]], 2, 4096, "bad_roles"),
        ([TWO_ROUNDS[0]], 1, 4096, "bad_roles"),
        ([TWO_ROUNDS[0], {"from": "gpt", "value": "see <image>"}], 2, 4096, "image_in_answer"),
        (TWO_ROUNDS, 1, 300, "truncation_cuts_image"),
    ],
)
def test_other_skips(llama_tokenizer, conv, num_images, max_length, reason):
    with pytest.raises(SkipSample) as err:
        encode(llama_tokenizer, conv, "vicuna_v1", num_images=num_images, max_length=max_length)
    assert err.value.reason == reason


def test_truncation_keeps_image_runs_whole_and_needs_a_target(llama_tokenizer):
    full = encode(llama_tokenizer, TWO_ROUNDS, "vicuna_v1")
    first_answer_end = label_spans(full.labels)[0]
    # Cut inside the second round: the first answer survives, the image run is whole.
    cut = int((full.labels != IGNORE_INDEX).nonzero()[len(first_answer_end) + 2])
    sample = encode(llama_tokenizer, TWO_ROUNDS, "vicuna_v1", max_length=cut)
    assert len(sample.input_ids) == cut
    assert torch.equal(sample.input_ids, full.input_ids[:cut])
    # Cut right after the image run and before any answer: nothing left to learn.
    img_end = int((full.input_ids == image_token_id(llama_tokenizer)).nonzero()[-1]) + 1
    with pytest.raises(SkipSample) as err:
        encode(llama_tokenizer, TWO_ROUNDS, "vicuna_v1", max_length=img_end + 2)
    assert err.value.reason == "no_target_after_truncation"


def test_text_only_sample_has_no_image_tokens(llama_tokenizer):
    conv = [{"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4"}]
    sample = encode(llama_tokenizer, conv, "vicuna_v1", num_images=0)
    assert image_token_id(llama_tokenizer) not in sample.input_ids.tolist()
    assert [llama_tokenizer.decode(s) for s in label_spans(sample.labels)] == ["4</s>"]


def test_replaced_system_prompt_is_rendered_and_masked(llama_tokenizer):
    """`data.system_prompt` replaces the template's: "" drops it, the answers keep exactly their labels."""
    own = encode(llama_tokenizer, TWO_ROUNDS, "vicuna_v1")
    template = get_template("vicuna_v1", system="")
    assert template.render(TWO_ROUNDS[:2]).text.startswith("USER: <image>\nWhat is in this picture?")
    bare = encode(llama_tokenizer, TWO_ROUNDS, template)
    assert VICUNA_SYSTEM not in llama_tokenizer.decode(bare.input_ids)
    assert len(bare.input_ids) < len(own.input_ids)
    trained = bare.labels[bare.labels != IGNORE_INDEX]
    assert torch.equal(trained, own.labels[own.labels != IGNORE_INDEX])
    custom = get_template("vicuna_v1", system="Answer briefly.")
    assert custom.render(TWO_ROUNDS[:2]).text.startswith("Answer briefly. USER: ")
    assert get_template("vicuna_v1", system=None) is get_template("vicuna_v1")
