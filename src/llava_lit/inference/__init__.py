"""Inference for trained models: loading from checkpoints, prompt building and batched KV-cache generation.

`predict`, `chat` and `serve` are thin front ends over these three modules, so every caller (evaluation, the
miniature world's proof, sample tables, the teacher pipeline) decodes through one path.
"""

from llava_lit.inference.generation import Completion, Generator, SamplingParams, StreamDelta
from llava_lit.inference.loading import InferenceBundle, load_for_inference
from llava_lit.inference.prompts import Prompt, PromptError, build_prompt
from llava_lit.load_settings import LoadSettings

__all__ = [
    "Completion",
    "Generator",
    "InferenceBundle",
    "LoadSettings",
    "Prompt",
    "PromptError",
    "SamplingParams",
    "StreamDelta",
    "build_prompt",
    "load_for_inference",
]
