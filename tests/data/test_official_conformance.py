"""Token-exact agreement with the official LLaVA preprocessing, for training samples and inference prompts.

`golden/official_llava_preprocess.json` (read by `tests/official_golden.py`) holds ids and labels produced by running the official code
(haotian-liu/LLaVA: `preprocess_multimodal`, `preprocess_plain` / `preprocess_v1` / `preprocess_llama_2`,
`tokenizer_image_token`, and the prompt lines of `model_vqa_loader` / `model_vqa_science`) with its pinned
transformers 4.37.2, on the real 32k LLaMA-style SentencePiece model this test suite uses, in both `legacy`
modes; the file's `provenance` says exactly how. Its `chatml` part holds the same for LLaVA-NeXT's Qwen ChatML
preprocessing, on a ChatML tokenizer built for these tests (`golden/chatml_tokenizer`). Image positions are the official -200; here each image is one
placeholder (`num_image_tokens=1`), so positions line up one to one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llava_lit.constants import IGNORE_INDEX
from llava_lit.conversation import get_template
from llava_lit.inference.prompts import build_prompt
from llava_lit.predict import question_turns
from llava_lit.tokenization import encode_conversation, load_tokenizer, tokenizer_legacy
from official_golden import GOLDEN, OFFICIAL_IMAGE, case_id, official_view, question_for


@pytest.fixture(scope="module")
def tokenizers(llama_tokenizer_dir: Path) -> dict[bool, object]:
    """The fixture's tokenizer in both modes, loaded as training loads it."""
    digest = hashlib.sha256((llama_tokenizer_dir / "tokenizer.model").read_bytes()).hexdigest()
    assert digest == GOLDEN["provenance"]["tokenizer_sha256"], (
        "not the tokenizer the golden ids were made with"
    )
    return {legacy: load_tokenizer(str(llama_tokenizer_dir), legacy=legacy) for legacy in (True, False)}


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=case_id)
def test_training_samples_equal_the_official_preprocessing(case, tokenizers):
    tokenizer = tokenizers[case["legacy"]]
    assert not case["official_labels_all_ignored"]  # no case hits the official code's mismatch path
    encoded = encode_conversation(
        case["conversations"],
        tokenizer=tokenizer,
        template=case["template"],
        num_image_tokens=1,
        max_length=case["model_max_length"],
        num_images=case["input_ids"].count(OFFICIAL_IMAGE),
    )
    assert official_view(encoded.input_ids.tolist(), tokenizer) == case["input_ids"]
    labels = official_view(encoded.labels.tolist(), tokenizer)
    assert labels == case["labels"]


@pytest.mark.parametrize("prompt", GOLDEN["prompts"], ids=case_id)
def test_inference_prompts_equal_the_official_eval_prompts(prompt, tokenizers):
    tokenizer = tokenizers[prompt["legacy"]]
    question = question_for(prompt["line"], prompt["loader"])
    images = torch.zeros(1, 3, 8, 8) if question.image else None
    built = build_prompt(
        question_turns(question),
        tokenizer=tokenizer,
        template=get_template(prompt["conv_mode"]),
        num_image_tokens=1,
        pixel_values=images,
    )
    assert official_view(built.input_ids, tokenizer) == prompt["input_ids"]


def test_the_legacy_mode_is_decided_once(llama_tokenizer_dir, tmp_path):
    """A setting wins; else the folder's `tokenizer_config.json`; else legacy, as transformers 4.37 reads a
    folder that does not say (transformers 5 alone would read it as non-legacy)."""
    from transformers import LlamaTokenizer

    folder = tmp_path / "saved"
    LlamaTokenizer.from_pretrained(str(llama_tokenizer_dir), legacy=False).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "legacy" not in config  # transformers 5 does not record it
    assert tokenizer_legacy(load_tokenizer(str(folder))) is True
    assert tokenizer_legacy(load_tokenizer(str(llama_tokenizer_dir))) is True
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    assert tokenizer_legacy(load_tokenizer(str(folder))) is False
    assert tokenizer_legacy(load_tokenizer(str(folder), legacy=True)) is True
    # The modes differ where it matters: the text after a special token.
    ids = {
        legacy: load_tokenizer(str(folder), legacy=legacy)("</s>USER")["input_ids"]
        for legacy in (True, False)
    }
    assert ids[True] != ids[False]


def test_training_records_the_mode_it_used(compose_train):
    from llava_lit.train import build_components

    cfg = compose_train("model.tokenizer_legacy=null")
    module, _ = build_components(cfg)
    assert module.run_config["model"]["tokenizer_legacy"] is True  # the tiny tokenizer folder records no mode
    cfg = compose_train("model.tokenizer_legacy=false")
    module, _ = build_components(cfg)
    assert module.run_config["model"]["tokenizer_legacy"] is False


CHATML = GOLDEN["chatml"]
CHATML_TOKENIZER = Path(__file__).parent / "golden" / "chatml_tokenizer"


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return load_tokenizer(str(CHATML_TOKENIZER))


@pytest.mark.parametrize("case", CHATML["cases"], ids=lambda c: c["name"])
def test_chatml_samples_equal_llava_next(case, chatml_tokenizer):
    """The ids of LLaVA-NeXT's Qwen ChatML preprocessing; the labels train on a part of what it trains on (the
    answers and their `<|im_end|>\\n`, not the role headers and every newline it also trains on)."""
    encoded = encode_conversation(
        case["conversations"],
        tokenizer=chatml_tokenizer,
        template="chatml",
        num_image_tokens=1,
        max_length=2048,
        num_images=case["input_ids"].count(OFFICIAL_IMAGE),
    )
    assert official_view(encoded.input_ids.tolist(), chatml_tokenizer) == case["input_ids"]
    labels = official_view(encoded.labels.tolist(), chatml_tokenizer)
    trained = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
    assert trained and all(labels[k] == case["labels"][k] for k in trained)
    decoded = chatml_tokenizer.decode([labels[k] for k in trained])
    answers = [turn["value"] for turn in case["conversations"] if turn["from"] == "gpt"]
    assert decoded == "".join(f"{answer}<|im_end|>\n" for answer in answers)


@pytest.mark.parametrize("prompt", CHATML["prompts"], ids=lambda p: p["question"][:20])
def test_chatml_prompts_equal_llava_next(prompt, chatml_tokenizer):
    images = prompt["question"].count("<image>")
    built = build_prompt(
        [{"from": "human", "value": prompt["question"]}],
        tokenizer=chatml_tokenizer,
        template=get_template("chatml"),
        num_image_tokens=1,
        pixel_values=torch.zeros(images, 3, 8, 8) if images else None,
    )
    assert official_view(built.input_ids, chatml_tokenizer) == prompt["input_ids"]
