"""Export to transformers' LLaVA: clean loading, same logits, same greedy tokens, exact round trip, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from llava_lit.checkpoint_reader import read_checkpoint
from llava_lit.conversation import get_template
from llava_lit.images import ImageLoader
from llava_lit.inference.generation import SamplingParams
from llava_lit.inference.loading import bundle_from_model, load_for_inference
from llava_lit.interop.export_hf import export_hf_llava, verify_export
from llava_lit.tokenization import load_tokenizer

RUN_CONFIG = {
    "data": {"template": "vicuna_v1", "image_aspect": "pad"},
    "run_name": "tiny",
    "stage": {"name": "x"},
}
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "A disc."},
    {"role": "user", "content": "What colour is it?"},
]
TURNS = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A disc."},
    {"from": "human", "value": "What colour is it?"},
]


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_transformers_loads_without_key_warnings(exported: Path, tiny_llava) -> None:
    model, info = LlavaForConditionalGeneration.from_pretrained(str(exported), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = model.config
    assert config.image_token_index == tiny_llava.image_token_id
    assert config.image_seq_length == tiny_llava.num_image_tokens == 16
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu" and config.multimodal_projector_bias is True
    processor = AutoProcessor.from_pretrained(str(exported))
    assert processor.image_processor.do_pad is True
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == tiny_llava.image_token_id
    assert (exported / "README.md").read_text().startswith("---")


def test_same_inputs_and_logits_as_llava_lit(exported: Path, tiny_llava, llama_tokenizer, wide_image) -> None:
    hf = LlavaForConditionalGeneration.from_pretrained(str(exported)).eval()
    processor = AutoProcessor.from_pretrained(str(exported))
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=wide_image, text=prompt, return_tensors="pt")

    bundle = bundle_from_model(tiny_llava, llama_tokenizer, RUN_CONFIG)
    pixels = ImageLoader(tiny_llava.vision_tower.image_processor, aspect="pad", output="normalized")(
        _png(wide_image)
    )
    ours = bundle.prompt(TURNS, [pixels])
    # The processor reproduces our prompt ids (image run expanded, BOS included) and our padded pixels.
    assert inputs["input_ids"][0].tolist() == ours.input_ids
    # Our resize is PIL's; a torchvision-backed processor resamples a few pixels one 8-bit level apart.
    torch.testing.assert_close(inputs["pixel_values"][0], pixels, atol=0.03, rtol=0)
    assert (inputs["pixel_values"][0] - pixels).abs().mean() < 1e-3

    with torch.no_grad():
        theirs = hf(**inputs).logits
        mine = tiny_llava(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).logits
    torch.testing.assert_close(theirs, mine)


def test_greedy_generation_matches_predict(exported: Path, tiny_llava, llama_tokenizer, wide_image) -> None:
    hf = LlavaForConditionalGeneration.from_pretrained(str(exported)).eval()
    processor = AutoProcessor.from_pretrained(str(exported))
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=wide_image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=12, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1] :].tolist()

    bundle = bundle_from_model(tiny_llava, llama_tokenizer, RUN_CONFIG)
    pixels = ImageLoader(tiny_llava.vision_tower.image_processor, aspect="pad")(_png(wide_image))
    completion = bundle.generator().generate(
        [bundle.prompt(TURNS, [pixels])], SamplingParams(max_new_tokens=12)
    )[0]
    assert completion.token_ids == theirs[: len(completion.token_ids)]
    if completion.finish_reason == "length":
        assert len(completion.token_ids) == 12 == len(theirs)


def test_round_trip_is_exact(exported: Path, tiny_llava, tmp_path: Path) -> None:
    pretrained = read_checkpoint(str(exported), workdir=tmp_path)
    assert pretrained.kind == "hf" and pretrained.template == "vicuna_v1" and pretrained.image_aspect == "pad"
    model, tokenizer = pretrained.build()
    ours, back = tiny_llava.state_dict(), model.state_dict()
    assert ours.keys() == back.keys()
    for key in ours:
        assert torch.equal(ours[key], back[key]), key
    assert tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id == tiny_llava.image_token_id
    assert model.vision_tower.image_processor.crop_size == tiny_llava.vision_tower.image_processor.crop_size


def test_system_prompt_survives_export_and_import(tiny_llava, llama_tokenizer, tmp_path: Path) -> None:
    """A run trained without a system prompt (`data.system_prompt: ""`) is prompted without one after export."""
    template = get_template("vicuna_v1", system="")
    folder = export_hf_llava(
        tiny_llava, llama_tokenizer, tmp_path / "hf", template=template, image_aspect="pad"
    )
    pretrained = read_checkpoint(str(folder), workdir=tmp_path / "work")
    assert (pretrained.template, pretrained.system_prompt) == ("vicuna_v1", "")
    bundle = load_for_inference(str(folder))
    assert bundle.template == template
    text = bundle.tokenizer.decode(bundle.prompt([{"from": "human", "value": "Hi"}]).input_ids)
    assert "USER: Hi ASSISTANT:" in text and "chat between" not in text


@pytest.mark.parametrize("legacy", [True, False])
def test_the_tokenizer_mode_survives_export_and_import(
    legacy, tiny_llava, llama_tokenizer_dir, tmp_path
) -> None:
    """The export tokenizes as the model was trained, under transformers and llava_lit alike: the SentencePiece
    `legacy` mode is in its tokenizer files and written into `tokenizer_config.json` (transformers 5 does not
    write it, and reads a folder without it as non-legacy)."""
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(str(llama_tokenizer_dir), legacy=legacy)
    other = load_tokenizer(str(llama_tokenizer_dir), legacy=not legacy)
    folder = export_hf_llava(tiny_llava, tokenizer, tmp_path / "hf", template="vicuna_v1", image_aspect="pad")
    assert json.loads((folder / "tokenizer_config.json").read_text())["legacy"] is legacy
    text = "USER: Hi</s>USER: Again"
    assert tokenizer(text)["input_ids"] != other(text)["input_ids"]  # the modes differ after `</s>`
    for reloaded in (AutoTokenizer.from_pretrained(str(folder)), load_for_inference(str(folder)).tokenizer):
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_bf16_export_verifies(make_tiny, llama_tokenizer, tmp_path: Path) -> None:
    model = make_tiny()
    out = export_hf_llava(
        model, llama_tokenizer, tmp_path, template="plain", image_aspect="crop", dtype=torch.bfloat16
    )
    hf = LlavaForConditionalGeneration.from_pretrained(str(out))
    assert next(hf.parameters()).dtype == torch.bfloat16
    assert AutoProcessor.from_pretrained(str(out)).image_processor.do_pad is False
    assert verify_export(model.to(torch.bfloat16), out, atol=2e-2, rtol=2e-2) < 2e-2


@pytest.mark.parametrize("projector", ["linear", "mlp3x_gelu"])
def test_unrepresentable_projector_is_refused(projector: str, make_tiny, llama_tokenizer, tmp_path) -> None:
    model = make_tiny(projector)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        export_hf_llava(model, llama_tokenizer, tmp_path, template="vicuna_v1", image_aspect="pad")
    assert not (tmp_path / "config.json").exists()
