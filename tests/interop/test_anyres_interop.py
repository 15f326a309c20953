"""AnyRes (LLaVA-NeXT) to and from transformers and the official LLaVA-1.6 layout: same token counts, same logits,
same greedy tokens, exact round trips, and clear refusals of what neither side can represent.

The tiny tower reads 56 px (patch 14, a 4x4 feature grid), so the pinpoints are LLaVA-NeXT's grids at 56 px; the
image sizes cover wide, tall, square and extreme shapes (each takes another grid and unpads rows or columns).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from inference_helpers import write_official
from llava_lit.checkpoint_reader import CheckpointKind, classify_checkpoint, read_checkpoint
from llava_lit.image_tiling import AnyResSettings
from llava_lit.images import normalize_pixels, pixel_table
from llava_lit.inference.generation import SamplingParams
from llava_lit.inference.loading import bundle_from_model
from llava_lit.interop.export_hf import export_hf_llava, verify_export
from llava_lit.model import LlavaModel, build_llava

PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]  # [height, width], LLaVA-NeXT's grids
SIZES = [(30, 70), (100, 40), (56, 56), (9, 200)]  # (height, width)
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
]
TURNS = [
    {"from": "human", "value": "<image>\nWhat is in the picture?"}
]  # MESSAGES in our conversation format
RUN_CONFIG = {
    "data": {"template": "vicuna_v1", "image_aspect": "anyres"},
    "run_name": "tiny",
    "stage": {"name": "x"},
}


def _build(tiny_backbones: Path, tokenizer, seed: int = 0, **anyres) -> LlavaModel:
    torch.manual_seed(seed)
    return build_llava(
        vision_tower={"name_or_path": str(tiny_backbones / "clip")},
        projector="mlp2x_gelu",
        language_model={"name_or_path": str(tiny_backbones / "llm")},
        tokenizer=tokenizer,
        anyres={"grid_pinpoints": PINPOINTS, **anyres},
    ).eval()


def _image(height: int, width: int) -> Image.Image:
    """A picture of smooth gradients and a disc (resampling backends agree closely on it, unlike on noise)."""
    y, x = np.mgrid[0:height, 0:width]
    disc = (x - width / 2) ** 2 + (y - height / 3) ** 2 < (min(height, width) / 3) ** 2
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), disc * 200], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture(scope="module")
def anyres_llava(tiny_backbones: Path, llama_tokenizer) -> LlavaModel:
    return _build(tiny_backbones, llama_tokenizer)


@pytest.fixture(scope="module")
def next_export(anyres_llava: LlavaModel, llama_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf_llava(
        anyres_llava,
        llama_tokenizer,
        tmp_path_factory.mktemp("next_export"),
        template="vicuna_v1",
        image_aspect="anyres",
    )


@pytest.fixture(scope="module")
def hf_next(next_export: Path) -> LlavaNextForConditionalGeneration:
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        str(next_export), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


def _hf_inputs(folder: Path, height: int, width: int) -> dict[str, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(str(folder))
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return processor(images=_image(height, width), text=prompt, return_tensors="pt")


def _our_logits(model: LlavaModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Our logits on a processor's inputs: its padded `[1, max tiles, 3, H, W]` pixels cut to the image's tiles."""
    height, width = inputs["image_sizes"][0].tolist()
    tiles = inputs["pixel_values"][0, : model.tile_layout.num_tiles(height, width)]  # [tiles, 3, H, W]
    with torch.no_grad():
        return model(
            inputs["input_ids"], inputs["attention_mask"], tiles, image_sizes=inputs["image_sizes"]
        ).logits


def test_export_is_a_llava_next_folder(next_export: Path, hf_next, anyres_llava: LlavaModel) -> None:
    config = hf_next.config
    assert config.model_type == "llava_next" and config.architectures == ["LlavaNextForConditionalGeneration"]
    assert config.image_grid_pinpoints == PINPOINTS
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.image_token_id == anyres_llava.image_token_id
    torch.testing.assert_close(
        hf_next.model.image_newline, anyres_llava.projector.image_newline, rtol=0, atol=0
    )
    processor = AutoProcessor.from_pretrained(str(next_export))
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert type(processor.image_processor).__name__.startswith("LlavaNextImageProcessor")
    assert processor.image_processor.image_grid_pinpoints == PINPOINTS
    assert classify_checkpoint(next_export) is CheckpointKind.EXPORTED_FOLDER
    card = (next_export / "README.md").read_text()
    assert "- llava_next" in card and "LlavaNextForConditionalGeneration.from_pretrained" in card


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_processor_token_count_pixels_and_logits_equal_ours(
    height: int, width: int, next_export: Path, hf_next, anyres_llava: LlavaModel
) -> None:
    inputs = _hf_inputs(next_export, height, width)
    assert inputs["image_sizes"].tolist() == [[height, width]]
    n_image = int((inputs["input_ids"] == anyres_llava.image_token_id).sum())
    assert n_image == anyres_llava.image_tokens(height, width)
    # The exported image processor cuts our tiles: exactly with transformers' PIL backend (its default torchvision
    # backend resamples differently, which the logits below do not depend on: both models read its pixels).
    layout = anyres_llava.tile_layout
    pil = LlavaNextImageProcessorPil.from_pretrained(str(next_export))
    expected = pil(images=_image(height, width), return_tensors="pt")["pixel_values"][0]
    ours = normalize_pixels(
        layout.tiles(_image(height, width), resample=3),
        pixel_table(anyres_llava.vision_tower.image_processor),
    )
    assert expected.shape[0] >= ours.shape[0] == layout.num_tiles(height, width)
    torch.testing.assert_close(ours, expected[: ours.shape[0]].float(), rtol=0, atol=1e-6)
    with torch.no_grad():
        hf_logits = hf_next(**inputs).logits
    torch.testing.assert_close(hf_logits, _our_logits(anyres_llava, inputs))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(("height", "width"), SIZES[::3])
def test_greedy_generation_matches_predict(
    height: int, width: int, next_export: Path, hf_next, anyres_llava: LlavaModel, llama_tokenizer
) -> None:
    """transformers' `generate` on the export gives the tokens of our generator (the predict/chat/serve path)."""
    inputs = _hf_inputs(next_export, height, width)
    with torch.no_grad():
        out = hf_next.generate(**inputs, max_new_tokens=10, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1] :].tolist()

    bundle = bundle_from_model(anyres_llava, llama_tokenizer, RUN_CONFIG)
    image = bundle.image_loader(_png(_image(height, width)))  # whole view + tiles, and the size
    prompt = bundle.prompt(TURNS, [image])
    assert prompt.input_ids == inputs["input_ids"][0].tolist()  # the processor expands <image> as we do
    completion = bundle.generator().generate([prompt], SamplingParams(max_new_tokens=10))[0]
    assert completion.token_ids == theirs[: len(completion.token_ids)]
    if completion.finish_reason == "length":
        assert len(completion.token_ids) == 10 == len(theirs)


def test_verify_export_checks_anyres(next_export: Path, anyres_llava: LlavaModel) -> None:
    assert verify_export(anyres_llava, next_export) < 1e-4


def test_export_import_round_trip_is_exact(
    next_export: Path, anyres_llava: LlavaModel, tmp_path: Path
) -> None:
    pretrained = read_checkpoint(str(next_export), workdir=tmp_path)
    assert (
        pretrained.kind == "hf" and pretrained.image_aspect == "anyres" and pretrained.template == "vicuna_v1"
    )
    assert pretrained.config.anyres == AnyResSettings(grid_pinpoints=PINPOINTS)
    model, _ = pretrained.build()
    model.eval()
    ours, back = anyres_llava.state_dict(), model.state_dict()
    assert ours.keys() == back.keys()
    for key in ours:
        assert torch.equal(ours[key], back[key]), key
    inputs = _hf_inputs(next_export, 9, 200)
    torch.testing.assert_close(_our_logits(model, inputs), _our_logits(anyres_llava, inputs), rtol=0, atol=0)


def _write_official_next(
    model: LlavaModel, folder: Path, tiny_backbones: Path, tokenizer_dir: Path, **config
):
    """`model` saved as an official LLaVA-1.6 release: `model.image_newline`, anyres + spatial_unpad, and the
    pinpoints as the official code reads them, [width, height]."""
    write_official(model, folder, tiny_backbones, tokenizer_dir, with_tower=True)
    state = load_file(str(folder / "model.safetensors"))
    state["model.image_newline"] = state.pop("model.mm_projector.image_newline")
    save_file(state, str(folder / "model.safetensors"))
    settings = json.loads((folder / "config.json").read_text())
    settings.update(
        {
            "image_aspect_ratio": "anyres",
            "mm_patch_merge_type": "spatial_unpad",
            "image_grid_pinpoints": [[w, h] for h, w in model.tile_layout.pinpoints],
            **config,
        }
    )
    (folder / "config.json").write_text(json.dumps(settings))
    return folder


def test_official_llava_16_folder_imports_with_equal_logits(
    tiny_backbones: Path, llama_tokenizer, llama_tokenizer_dir: Path, tmp_path: Path
) -> None:
    # Pinpoints without their transposes, so a [width, height] read as [height, width] would change the tiling.
    pinpoints = [[56, 112], [56, 168], [112, 112]]
    original = build_llava(
        vision_tower={"name_or_path": str(tiny_backbones / "clip")},
        projector="mlp2x_gelu",
        language_model={"name_or_path": str(tiny_backbones / "llm")},
        tokenizer=llama_tokenizer,
        anyres={"grid_pinpoints": pinpoints},
    ).eval()
    folder = _write_official_next(original, tmp_path / "official", tiny_backbones, llama_tokenizer_dir)
    pretrained = read_checkpoint(str(folder), workdir=tmp_path / "work")
    assert pretrained.kind == "official" and pretrained.image_aspect == "anyres"
    assert pretrained.config.anyres == AnyResSettings(grid_pinpoints=pinpoints)
    model, tokenizer = pretrained.build()
    model.eval()
    assert model.image_token_id == original.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    torch.testing.assert_close(
        model.projector.image_newline, original.projector.image_newline, rtol=0, atol=0
    )
    for height, width in SIZES:
        assert model.image_tokens(height, width) == original.image_tokens(height, width)
        assert model.tile_layout.grid(height, width) == original.tile_layout.grid(height, width)
    height, width = 100, 40
    n = original.image_tokens(height, width)
    ids = torch.tensor([[1, 319, *([original.image_token_id] * n), 1724, 338]])
    tiles = original.tile_layout.tiles(_image(height, width), resample=3)
    sizes = torch.tensor([[height, width]])
    with torch.no_grad():
        theirs = model(ids, torch.ones_like(ids), tiles, image_sizes=sizes).logits
        ours = original(ids, torch.ones_like(ids), tiles, image_sizes=sizes).logits
    torch.testing.assert_close(theirs, ours)


@pytest.mark.parametrize(
    ("setting", "reason"),
    [({"unpad": False}, "anyres.unpad off"), ({"newline": False}, "anyres.newline off")],
)
def test_layouts_transformers_lacks_are_refused(
    setting: dict, reason: str, tiny_backbones: Path, llama_tokenizer, tmp_path: Path
) -> None:
    model = _build(tiny_backbones, llama_tokenizer, **setting)
    with pytest.raises(ValueError, match=reason):
        export_hf_llava(model, llama_tokenizer, tmp_path, template="vicuna_v1", image_aspect="anyres")
    assert not (tmp_path / "config.json").exists()


def test_aspect_must_match_the_model(
    anyres_llava: LlavaModel, make_tiny, llama_tokenizer, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="anyres"):
        export_hf_llava(anyres_llava, llama_tokenizer, tmp_path, template="vicuna_v1", image_aspect="pad")
    with pytest.raises(ValueError, match="anyres"):
        export_hf_llava(make_tiny(), llama_tokenizer, tmp_path, template="vicuna_v1", image_aspect="anyres")
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"image_aspect_ratio": "anyres_max_9"}, "anyres_max_9"),
        ({"mm_patch_merge_type": "spatial"}, "'spatial'"),
        ({"mm_patch_merge_type": "spatial_unpad_nobase"}, "spatial_unpad_nobase"),
        (
            {"image_aspect_ratio": "pad", "mm_patch_merge_type": "spatial_unpad"},
            "'flat' for one view per image",
        ),
        ({"image_grid_pinpoints": "[(336, 672), (672, 336)]"}, "list of \\[width, height\\] pairs"),
        ({"image_grid_pinpoints": [[56.0, 112]]}, "image_grid_pinpoints"),
    ],
)
def test_official_variants_we_lack_are_refused(
    config: dict,
    reason: str,
    anyres_llava: LlavaModel,
    tiny_backbones: Path,
    llama_tokenizer_dir: Path,
    tmp_path: Path,
) -> None:
    folder = _write_official_next(anyres_llava, tmp_path / "o", tiny_backbones, llama_tokenizer_dir, **config)
    with pytest.raises(ValueError, match=reason):
        read_checkpoint(str(folder), workdir=tmp_path / "work")


def test_official_anyres_stage1_projector_is_refused(tiny_backbones: Path, tmp_path: Path) -> None:
    folder = tmp_path / "stage1"
    folder.mkdir()
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32)}, folder / "mm_projector.bin")
    config = {
        "model_type": "llava_llama",
        "_name_or_path": str(tiny_backbones / "llm"),
        "mm_vision_tower": str(tiny_backbones / "clip"),
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "anyres",
        "mm_patch_merge_type": "spatial_unpad",
        "image_grid_pinpoints": PINPOINTS,
    }
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="image_newline"):
        read_checkpoint(str(folder / "mm_projector.bin"), workdir=tmp_path / "work")


@pytest.mark.parametrize(
    ("section", "change", "reason"),
    [
        ("model", {"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy='full'"),
        ("model", {"image_grid_pinpoints": [[56, 112]]}, "the model config lays out"),
        ("model", {"image_grid_pinpoints": [["56", 112]]}, "image_grid_pinpoints"),
        ("image_processor", {"size": {"shortest_edge": 64}}, "one square tile size"),
    ],
)
def test_llava_next_folders_we_cannot_reproduce_are_refused(
    section: str, change: dict, reason: str, next_export: Path, tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "changed"
    shutil.copytree(next_export, folder)
    if section == "model":
        path = folder / "config.json"
        settings = json.loads(path.read_text())
        settings.update(change)
    else:  # transformers 5 keeps the image processor's settings inside processor_config.json
        path = folder / "processor_config.json"
        settings = json.loads(path.read_text())
        settings["image_processor"].update(change)
    path.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=reason):
        read_checkpoint(str(folder), workdir=tmp_path / "work")


def test_export_cli_writes_a_llava_next_folder(
    anyres_llava: LlavaModel, tiny_run_config: dict, tmp_path: Path
) -> None:
    """`python -m llava_lit.export` of an AnyRes training checkpoint: a verified LLaVA-NeXT folder."""
    from llava_lit.export import main
    from llava_lit.hydra_app import compose_config

    run_config = json.loads(json.dumps(tiny_run_config))
    run_config["model"]["anyres"] = {"grid_pinpoints": PINPOINTS, "unpad": True, "newline": True}
    run_config["data"]["image_aspect"] = "anyres"
    checkpoint = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in anyres_llava.state_dict().items()}
    torch.save({"llava_lit_config": run_config, "state_dict": state}, checkpoint)
    out = main(compose_config("export", [f"checkpoint={checkpoint}", f"out={tmp_path / 'hf'}"]))
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(out))
    torch.testing.assert_close(hf.model.image_newline, anyres_llava.projector.image_newline, rtol=0, atol=0)
    assert AutoProcessor.from_pretrained(str(out)).image_processor.image_grid_pinpoints == PINPOINTS


def test_llava_hf_older_key_layout_imports(
    next_export: Path, anyres_llava: LlavaModel, tmp_path: Path
) -> None:
    """Most llava-hf LLaVA-NeXT repositories hold the pre-4.52 keys: `image_newline` at the top level,
    `vision_tower.vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`."""
    import shutil

    folder = tmp_path / "older"
    shutil.copytree(next_export, folder)
    renames = (
        ("model.image_newline", "image_newline"),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    )
    older = {}
    for key, value in load_file(str(folder / "model.safetensors")).items():
        new, old = next((new, old) for new, old in renames if key.startswith(new))
        older[old + key[len(new) :]] = value
    assert "image_newline" in older and "vision_tower.vision_model.post_layernorm.weight" in older
    save_file(older, str(folder / "model.safetensors"))
    model, _ = read_checkpoint(str(folder), workdir=tmp_path / "work").build()
    for key, value in anyres_llava.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
