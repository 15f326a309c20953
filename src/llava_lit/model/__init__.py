"""The LLaVA model: vision tower, projector, language model and the splice that joins them."""

from llava_lit.model.language_model import (
    LanguageModelConfig,
    build_language_model,
    resize_embeddings_for_tokenizer,
)
from llava_lit.model.llava import LlavaModel, LlavaModelConfig, build_llava, image_token_id_of
from llava_lit.model.projector import PROJECTOR_TYPES, build_projector
from llava_lit.model.vision_tower import VisionTower, VisionTowerConfig, build_vision_tower

__all__ = [
    "PROJECTOR_TYPES",
    "LanguageModelConfig",
    "LlavaModel",
    "LlavaModelConfig",
    "VisionTower",
    "VisionTowerConfig",
    "build_language_model",
    "build_llava",
    "build_projector",
    "build_vision_tower",
    "image_token_id_of",
    "resize_embeddings_for_tokenizer",
]
