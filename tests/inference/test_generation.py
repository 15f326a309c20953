"""Generation on the tiny model: batching, KV cache, prompts vs training tokenization, stops and streaming."""

from __future__ import annotations

import pytest
import torch

from inference_helpers import png_bytes
from llava_lit.inference import SamplingParams, load_for_inference
from llava_lit.inference.generation import _settled_prefix
from llava_lit.tokenization import encode_conversation


def _prompts(bundle):
    """Image and text-only prompts of different lengths (so left padding differs per row)."""
    pixels = [bundle.image_loader(png_bytes(i)) for i in range(3)]
    return [
        bundle.prompt([{"from": "human", "value": "<image>\nWhat is in the image?"}], [pixels[0]]),
        bundle.prompt([{"from": "human", "value": "Tell me a long story about two cats and a dog, please."}]),
        bundle.prompt([{"from": "human", "value": "<image>\nColors?"}], [pixels[1]]),
        bundle.prompt(
            [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A photo."},
                {"from": "human", "value": "Of what?"},
            ],
            [pixels[2]],
        ),
    ]


def test_prompt_ids_are_the_training_tokenization_up_to_the_answer(tiny_bundle):
    bundle = tiny_bundle
    turns = [
        {"from": "human", "value": "What is shown?\n<image>"},
        {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "And its size?"},
        {"from": "gpt", "value": "It is small."},
    ]
    pixels = bundle.image_loader(png_bytes(0))
    encoded = encode_conversation(
        turns,
        tokenizer=bundle.tokenizer,
        template=bundle.template,
        num_image_tokens=bundle.num_image_tokens,
        max_length=1000,
        num_images=1,
    )
    for n_turns in (1, 3):
        prompt = bundle.prompt(turns[:n_turns], [pixels])
        n = len(prompt.input_ids)
        assert encoded.input_ids[:n].tolist() == prompt.input_ids
        # The next training token is the first label: the prompt ends exactly where an answer begins.
        assert int(encoded.labels[n]) == int(encoded.input_ids[n])
        assert int(encoded.labels[n - 1]) == -100


def test_batched_greedy_equals_one_by_one(tiny_bundle):
    gen = tiny_bundle.generator()
    prompts = _prompts(tiny_bundle)
    params = SamplingParams(max_new_tokens=12)
    batched = gen.generate(prompts, params)
    single = [gen.generate([p], params)[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.prompt_tokens == len(p.input_ids) for c, p in zip(batched, prompts, strict=True))
    # The image matters: the same question about another image gets other logits (guards the splice).
    assert batched[0].token_ids != batched[2].token_ids or batched[0].text != batched[2].text


def test_kv_cache_and_no_cache_agree(tiny_bundle):
    gen = tiny_bundle.generator()
    prompts = _prompts(tiny_bundle)
    params = SamplingParams(max_new_tokens=10)
    cached = gen.generate(prompts, params, use_cache=True)
    uncached = gen.generate(prompts, params, use_cache=False)
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]


def test_decoding_runs_eagerly_where_training_compiled_the_decoder_layers(tiny_checkpoint, tiny_bundle):
    """The sample-answer callback decodes with the training module's compiled layers: nothing may compile."""
    from torch._dynamo.utils import counters

    from llava_lit.module import compile_decoder_layers

    compiled = load_for_inference(tiny_checkpoint)
    compile_decoder_layers(compiled.model)
    params = SamplingParams(max_new_tokens=8)
    before = sum(counters["frames"].values())
    answers = compiled.generator().generate(_prompts(compiled), params)
    assert sum(counters["frames"].values()) == before  # no frame went to Dynamo
    expected = tiny_bundle.generator().generate(_prompts(tiny_bundle), params)
    assert [c.token_ids for c in answers] == [c.token_ids for c in expected]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_bundle):
    gen = tiny_bundle.generator()
    prompts = _prompts(tiny_bundle)[:2]
    a = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.5, seed=3))
    b = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.5, seed=3))
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=8))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.token_ids for c in a] != [c.token_ids for c in greedy]
    # top_p so small that only the most likely token survives: sampling becomes greedy.
    nucleus = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=0))
    assert [c.token_ids for c in nucleus] == [c.token_ids for c in greedy]


def test_stop_string_cuts_the_answer_and_eos_stops(tiny_bundle):
    gen = tiny_bundle.generator()
    prompt = _prompts(tiny_bundle)[1]
    free = gen.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert free.finish_reason == "length" and free.completion_tokens == 12
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop.strip()
    cut = gen.generate([prompt], SamplingParams(max_new_tokens=12, stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert free.text.startswith(cut.text)
    # EOS by id: declare the first generated token an EOS and generation stops after it with empty text.
    gen.eos_ids = [free.token_ids[0]]
    eos = gen.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert eos.token_ids == free.token_ids[:1] and eos.finish_reason == "stop"


def test_stream_pieces_join_to_the_generated_text(tiny_bundle):
    gen = tiny_bundle.generator()
    for prompt in _prompts(tiny_bundle)[:2]:
        params = SamplingParams(max_new_tokens=15)
        deltas = list(gen.stream(prompt, params))
        whole = gen.generate([prompt], params)[0]
        assert "".join(d.text for d in deltas) == whole.text
        assert deltas[-1].completion is not None
        assert deltas[-1].completion.token_ids == whole.token_ids
        assert len(deltas) > 2


def test_settled_prefix_holds_back_partial_stops():
    assert _settled_prefix("Hello </", ("</s>",)) == "Hello"
    assert _settled_prefix("Hello <|im", ("<|im_end|>",)) == "Hello"
    assert _settled_prefix("Hello wor", ("<|im_end|>",)) == "Hello wor"
    assert _settled_prefix("caf\ufffd", ()) == "caf"


def test_too_long_prompt_raises(tiny_bundle):
    gen = tiny_bundle.generator()
    prompt = _prompts(tiny_bundle)[0]
    with pytest.raises(ValueError, match="maximum length"):
        gen.generate([prompt], SamplingParams(max_new_tokens=gen.max_length))


def test_checkpoint_loads_the_saved_weights(tiny_checkpoint, tiny_bundle):
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    loaded = tiny_bundle.model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key.removeprefix("model.")], value), key
    assert tiny_bundle.template.name == "vicuna_v1"
    assert tiny_bundle.model_id == "tiny/finetune"
    assert tiny_bundle.num_image_tokens == 16


def test_load_rejects_a_checkpoint_without_run_config(tmp_path, tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    del ckpt["llava_lit_config"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="llava_lit_config"):
        load_for_inference(tmp_path / "bare.ckpt")
