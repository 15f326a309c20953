"""An imported official LLaVA-1.5 checkpoint is prompted with exactly the ids the official evaluation gives it
(the golden `model_vqa_loader` prompts of `tests/data/golden/official_llava_preprocess.json`)."""

from __future__ import annotations

import pytest
import torch

from inference_helpers import write_official
from llava_lit.constants import IMAGE_TOKEN
from llava_lit.predict import question_turns
from llava_lit.tokenization import tokenizer_legacy
from official_golden import GOLDEN, official_view, question_for


@pytest.mark.parametrize("legacy", [False, None])
def test_an_imported_official_checkpoint_is_prompted_with_the_official_ids(
    legacy, make_tiny, tiny_backbones, llama_tokenizer_dir, tmp_path
):
    """An official-layout folder whose tokenizer says `legacy: false` (as the LLaVA-1.5 releases do), or nothing
    (then legacy, as transformers 4.37 reads it), gets the official `model_vqa_loader` prompt."""
    from llava_lit.inference import load_for_inference

    folder = write_official(
        make_tiny(),
        tmp_path / "official",
        tiny_backbones,
        llama_tokenizer_dir,
        with_tower=True,
        legacy=legacy,
    )
    bundle = load_for_inference(folder)
    expected_legacy = True if legacy is None else legacy
    assert tokenizer_legacy(bundle.tokenizer) is expected_legacy
    golden = next(
        p
        for p in GOLDEN["prompts"]
        if p["loader"] == "model_vqa_loader"
        and p["legacy"] is expected_legacy
        and p["line"]["question_id"] == 1
    )
    question = question_for(golden["line"], golden["loader"])
    size = bundle.model.vision_tower.image_processor.crop_size["height"]
    prompt = bundle.prompt(question_turns(question), [torch.zeros(3, size, size)])
    image = bundle.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    collapsed = [
        t for k, t in enumerate(prompt.input_ids) if not (t == image and prompt.input_ids[k - 1] == image)
    ]
    assert official_view(collapsed, bundle.tokenizer) == golden["input_ids"]
