"""The data path's own resize + crop and table normalisation against the HF CLIP image processor.

The reference is the processor's PIL backend (what the official LLaVA stack runs): pixels must be equal bit for
bit on real photos and odd sizes. The torchvision backend resamples slightly differently (at most a couple of
8-bit levels on a few pixels). The miniature world's images, already at the tower's size, must be equal to the
processor's output bit for bit on either backend, so its training figures do not move.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from llava_lit.images import (
    ImageLoader,
    normalize_pixels,
    pixel_table,
    processor_geometry,
    resize_and_crop,
)
from llava_lit.world.backbones import image_processor as world_image_processor
from llava_lit.world.config import WorldConfig
from llava_lit.world.scenes import blank_image, render_scene, sample_scene

from .conftest import encode

TORCHVISION_TOLERANCE = 0.03
"""Max abs difference (normalised units) to the torchvision backend: two 8-bit levels / CLIP's smallest std."""


def _photos() -> list[np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # 427 x 640
    photos += [getattr(data, k)() for k in ("astronaut", "chelsea", "coffee", "rocket")]
    return photos


def _odd_images() -> list[Image.Image]:
    photo = _photos()[1]
    return [
        Image.fromarray(photo[:1]),  # 1 x 640
        Image.fromarray(photo[:, :1]),  # 427 x 1
        Image.fromarray(photo[:3, :5]),  # tiny
        Image.fromarray(photo[:20]),  # 32:1
        Image.fromarray(photo).resize((3000, 97)),  # huge aspect, large
        Image.fromarray(photo).convert("L"),
        Image.fromarray(photo).convert("RGBA"),
        Image.fromarray(photo).convert("P"),
    ]


def _reference(processor, loader: ImageLoader, image: Image.Image) -> torch.Tensor:
    """The processor's float output for the loader's aspect handling of `image`: [3, H, W]."""
    return processor(images=loader.prepare(image.convert("RGB")), return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("aspect", ["pad", "crop", "resize"])
@pytest.mark.parametrize("side", [336, 56])
def test_equal_to_the_pil_processor_bit_for_bit(aspect, side):
    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    loader = ImageLoader(processor, aspect=aspect, output="normalized")
    images = [Image.fromarray(p) for p in _photos()] + _odd_images()
    for image in images:
        ours = loader(encode(image, "PNG"))
        reference = _reference(processor, loader, image)
        assert ours.shape == reference.shape == (3, side, side) and ours.dtype == torch.float32
        assert torch.equal(ours, reference), (image.size, image.mode, (ours - reference).abs().max())


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_close_to_the_torchvision_processor(aspect):
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    loader = ImageLoader(processor, aspect=aspect, output="normalized")
    for image in [Image.fromarray(p) for p in _photos()] + _odd_images()[:4]:
        ours = loader(encode(image, "PNG"))
        reference = _reference(processor, loader, image)
        assert ours.shape == reference.shape
        assert (ours - reference).abs().max() <= TORCHVISION_TOLERANCE
        assert (ours - reference).abs().mean() < 1e-3


def test_uint8_output_is_the_resized_crop_and_the_table_normalises_it():
    processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    data = encode(Image.fromarray(_photos()[0]), "JPEG")
    pixels = ImageLoader(processor, aspect="crop")(data)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 56, 56)
    normalized = ImageLoader(processor, aspect="crop", output="normalized")(data)
    assert torch.equal(normalize_pixels(pixels[None], pixel_table(processor))[0], normalized)
    with pytest.raises(TypeError):
        normalize_pixels(normalized, pixel_table(processor))
    with pytest.raises(ValueError):
        ImageLoader(processor, output="float16")


def test_geometry_follows_the_processor_rounding():
    geometry = processor_geometry(
        CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    )
    assert geometry is not None and geometry.resample == 3
    assert geometry.resized_size(480, 640) == (336, 448)
    assert geometry.resized_size(427, 640) == (336, 503)  # int(336 * 640 / 427) = 503.6 -> 503
    assert geometry.resized_size(640, 1) == (215040, 336)
    tiny = resize_and_crop(Image.new("RGB", (5, 3), (9, 9, 9)), geometry)
    assert tiny.shape == (3, 336, 336) and int(tiny.min()) == int(tiny.max()) == 9


def test_unknown_processors_are_called_as_they_are():
    class Halving:
        """A processor of another kind: halves every pixel value."""

        image_mean = (0.5, 0.5, 0.5)
        crop_size = {"height": 4, "width": 4}

        def __call__(self, images, return_tensors="pt"):
            array = np.asarray(images.resize((4, 4)), dtype=np.float32).transpose(2, 0, 1) / 2
            return {"pixel_values": torch.from_numpy(array)[None]}

    pixels = ImageLoader(Halving(), aspect="crop")(encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG"))
    assert pixels.dtype == torch.float32 and pixels[:, 0, 0].tolist() == [5.0, 10.0, 15.0]


@pytest.mark.parametrize("backend", [CLIPImageProcessor, CLIPImageProcessorPil])
def test_world_pixels_are_bitwise_the_processors(backend):
    cfg = WorldConfig()
    base = world_image_processor(cfg)
    processor = backend(
        **{k: v for k, v in base.to_dict().items() if k in ("size", "crop_size", "image_mean", "image_std")}
    )
    rng = np.random.default_rng(0)
    images = [render_scene(sample_scene(rng, cfg, f"s{i}"), cfg) for i in range(12)] + [blank_image(cfg)]
    for aspect in ("pad", "crop", "resize"):
        loader = ImageLoader(processor, aspect=aspect)
        for image in images:
            pixels = loader(encode(image, "PNG"))  # [3, 84, 84] uint8
            old = processor(images=image, return_tensors="pt")["pixel_values"]  # [1, 3, 84, 84]
            assert torch.equal(normalize_pixels(pixels[None], pixel_table(processor)), old)


def test_the_vision_tower_normalises_uint8_pixels_as_the_processor():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llava_lit.model.vision_tower import VisionTower

    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    tower = VisionTower(CLIPVisionModel(config).eval(), backend="hf_clip", image_processor=processor)
    loader = ImageLoader(processor, aspect="pad")
    images = [encode(Image.fromarray(p), "JPEG") for p in _photos()[:3]]
    uint8 = torch.stack([loader(b) for b in images])  # [3, 3, 28, 28]
    floats = torch.stack([ImageLoader(processor, aspect="pad", output="normalized")(b) for b in images])
    assert uint8.dtype == torch.uint8
    assert torch.equal(tower.normalize(uint8), floats)
    with torch.no_grad():
        assert torch.equal(tower(uint8), tower(floats))


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_torch_resize_stays_within_two_levels_of_pil(aspect):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    exact = ImageLoader(processor, aspect=aspect)
    fast = ImageLoader(processor, aspect=aspect, resize="torch")
    for photo in _photos():
        data = encode(Image.fromarray(photo), "PNG")
        ours, reference = fast(data).int(), exact(data).int()  # [3, 336, 336] 8-bit levels
        assert ours.shape == reference.shape
        assert (ours - reference).abs().max() <= 2
        assert (ours != reference).float().mean() < 0.01
    with pytest.raises(ValueError):
        ImageLoader(processor, resize="cv2")
