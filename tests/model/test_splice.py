"""The splice: projected image features land exactly on the image-placeholder positions, in order."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from llava_lit.model import LlavaModel, build_llava


def count_tower_calls(model: LlavaModel) -> list[int]:
    calls = [0]
    model.vision_tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def check_splice(model: LlavaModel, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
    """Text positions hold the token embeddings; the k-th image run holds image k's projected features."""
    with torch.no_grad():
        embeds = model.embed_inputs(input_ids, pixel_values)
        tokens = model.language_model.get_input_embeddings()(input_ids)
        mask = input_ids == model.image_token_id
        torch.testing.assert_close(embeds[~mask], tokens[~mask], rtol=0, atol=0)
        if pixel_values is None:
            assert not mask.any()
            return
        features = model.encode_images(pixel_values)  # [N, T, D]
        t = model.num_image_tokens
        k = 0
        for row in range(input_ids.shape[0]):
            positions = mask[row].nonzero().squeeze(1)
            for start in range(0, len(positions), t):
                torch.testing.assert_close(
                    embeds[row, positions[start : start + t]], features[k], rtol=0, atol=0
                )
                k += 1
        assert k == pixel_values.shape[0]


def test_splice_single_image_per_row(image_row, tiny_llava: LlavaModel) -> None:
    ids = torch.tensor(
        [image_row(tiny_llava, [1, 319], [29871, 13]), image_row(tiny_llava, [1], [450, 29892, 13])]
    )
    check_splice(tiny_llava, ids, torch.randn(2, 3, 56, 56))


def test_identity_like_projector_puts_raw_tower_features_in_place(image_row, build_tiny) -> None:
    """With a linear projector set to [I | 0], the spliced vectors are the tower's own features, zero-padded."""
    model = build_tiny(projector="linear").eval()
    proj = model.projector
    with torch.no_grad():
        proj.weight.zero_()
        proj.weight[:, :].copy_(torch.eye(proj.out_features, proj.in_features))
        proj.bias.zero_()
    ids = torch.tensor([image_row(model, [1, 319], [13])])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, pixels)
        raw = model.vision_tower(pixels)[0]  # [16, 32]
    start = 2
    torch.testing.assert_close(embeds[0, start : start + 16, :32], raw)
    assert embeds[0, start : start + 16, 32:].abs().max() == 0


def test_two_images_in_one_sample_take_images_in_order(image_row, tiny_llava: LlavaModel) -> None:
    ids = torch.tensor(
        [image_row(tiny_llava, [1, 319], [13], n_images=2), image_row(tiny_llava, [1], [13] * 19)]
    )
    pixels = torch.randn(3, 3, 56, 56)
    check_splice(tiny_llava, ids, pixels)
    out = tiny_llava(ids, torch.ones_like(ids), pixels)
    assert out.logits.shape == (2, ids.shape[1], tiny_llava.language_model.config.vocab_size)


def test_text_only_batch_never_calls_the_tower(tiny_llava: LlavaModel) -> None:
    calls = count_tower_calls(tiny_llava)
    ids = torch.tensor([[1, 319, 29871, 13], [1, 450, 29892, 13]])
    check_splice(tiny_llava, ids, None)
    logits = tiny_llava(ids, torch.ones_like(ids)).logits
    assert logits.shape[:2] == (2, 4)
    assert calls[0] == 0
    # Zero images as an empty tensor is a text-only batch too.
    tiny_llava.embed_inputs(ids, torch.empty(0, 3, 56, 56))
    assert calls[0] == 0


def test_mixed_batch_text_only_row_matches_its_solo_run(image_row, tiny_llava: LlavaModel) -> None:
    calls = count_tower_calls(tiny_llava)
    image_ids = image_row(tiny_llava, [1, 319], [13])
    text_ids = [1, 450, 29892, 13] + [tiny_llava.language_model.config.pad_token_id or 0] * (
        len(image_ids) - 4
    )
    ids = torch.tensor([text_ids, image_ids])
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    pixels = torch.randn(1, 3, 56, 56)
    check_splice(tiny_llava, ids, pixels)
    with torch.no_grad():
        mixed = tiny_llava(ids, mask, pixels).logits
        solo = tiny_llava(ids[:1, :4], mask[:1, :4]).logits
    assert (
        calls[0] == 3
    )  # check_splice: splice + reference encode; then the mixed forward; never the solo one
    torch.testing.assert_close(mixed[0, :4], solo[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_image_count_mismatch_raises(image_row, tiny_llava: LlavaModel, n_images: int) -> None:
    ids = torch.tensor([image_row(tiny_llava, [1], [13], n_images=2)])
    pixels = torch.randn(n_images, 3, 56, 56) if n_images else None
    with pytest.raises(ValueError, match=r"32 image-token positions .* but \d images"):
        tiny_llava.embed_inputs(ids, pixels)


def test_images_without_placeholders_raise(tiny_llava: LlavaModel) -> None:
    with pytest.raises(ValueError, match="0 image-token positions"):
        tiny_llava.embed_inputs(torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 56, 56))


def test_cut_image_run_raises(tiny_llava: LlavaModel) -> None:
    """Right count, wrong shape: a run of 20 and a run of 12 instead of two runs of 16."""
    img = tiny_llava.image_token_id
    ids = torch.tensor([[1] + [img] * 20 + [13] + [img] * 12 + [13]])
    with pytest.raises(ValueError, match="not 16 consecutive positions"):
        tiny_llava.embed_inputs(ids, torch.randn(2, 3, 56, 56))


def test_run_split_across_rows_raises(tiny_llava: LlavaModel) -> None:
    img = tiny_llava.image_token_id
    ids = torch.tensor([[1, 5, 6, 7] + [img] * 8, [img] * 8 + [13, 13, 13, 13]])
    with pytest.raises(ValueError, match="one row"):
        tiny_llava.embed_inputs(ids, torch.randn(1, 3, 56, 56))


def test_tokenizer_without_image_token_is_rejected(tiny_backbones) -> None:
    plain = AutoTokenizer.from_pretrained(tiny_backbones / "llm")
    with pytest.raises(ValueError, match="no '<image>' token"):
        build_llava(
            vision_tower={"name_or_path": str(tiny_backbones / "clip")},
            projector="linear",
            language_model={"name_or_path": str(tiny_backbones / "llm")},
            tokenizer=plain,
        )
