"""The teacher pipeline's output converts to shards and trains in the miniature world.

Ground truth of a few training scenes of the trained CI world goes through `llava_lit.generate` against a local
chat-completions server (a canned teacher that answers from the captions it is shown), the mixed LLaVA JSON is
converted to shards with the world's tokenizer, and a short `stage=finetune` runs on those shards through the real
config, starting from the world's align projector: the loss must be finite and a checkpoint written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from chat_completions_server import ChatCompletionsServer, user_text
from llava_lit.convert import convert
from llava_lit.generate import GenerateConfig, InputConfig, run
from llava_lit.openai_client import ChatClientConfig
from llava_lit.shards import read_manifest
from llava_lit.teacher.pipeline import MIXED_FILE, TeacherConfig
from llava_lit.tokenization import load_tokenizer
from llava_lit.world.config import WorldConfig
from llava_lit.world.scenes import Scene, SceneObject
from llava_lit.world.teacher_input import write_world_inputs

N_SCENES = 6
TYPES = ("conversation", "detail_description", "complex_reasoning")


def canned_teacher(body: dict) -> str:
    """A well-behaved teacher: every reply in the requested format, built from the captions it was shown."""
    system = body["messages"][0]["content"]
    captions = user_text(body).split("\n\n")[0].splitlines()
    if "Write a conversation" in system:
        return (
            f"Question:\nWhat is in the image?\n===\nAnswer:\n{captions[0]}\n===\n"
            f"Question:\nWhat is behind the shapes?\n===\nAnswer:\n{captions[1]}\n==="
        )
    if "describe the image in detail" in system:
        return " ".join(captions)
    return f"Question:\nWhich shape would you notice first, and why?\n===\nAnswer:\n{captions[-1]} It stands out."


def load_scenes(path: Path, n: int) -> list[Scene]:
    """The first `n` scenes of a world ground-truth JSONL."""
    scenes = []
    for line in path.read_text().splitlines()[:n]:
        row = json.loads(line)
        scenes.append(
            Scene(
                scene_id=row["scene_id"],
                background=row["background"],
                background_rgb=tuple(row["background_rgb"]),
                objects=tuple(SceneObject(**o) for o in row["objects"]),
            )
        )
    return scenes


@pytest.mark.slow
def test_teacher_output_converts_and_trains_in_the_world(trained_world: dict, tmp_path: Path) -> None:
    from llava_lit.train import train
    from llava_lit.world.evaluate import compose_train

    world = trained_world["world"]
    info = json.loads((world / "world.json").read_text())
    cfg = WorldConfig(**info["config"])  # the world the fixture built
    assert info["fingerprint"] == cfg.fingerprint()

    scenes = load_scenes(world / "scenes" / "train.jsonl", N_SCENES)
    inputs = tmp_path / "teacher_inputs.jsonl"
    write_world_inputs(scenes, cfg, inputs, image_pattern="train/{scene_id}.png")
    teacher_out = tmp_path / "teacher"
    with ChatCompletionsServer(canned_teacher) as server:
        summary = run(
            GenerateConfig(
                input=InputConfig(jsonl=str(inputs)),
                teacher=TeacherConfig(),
                client=ChatClientConfig(
                    base_url=server.url,
                    model="teacher",
                    api_key="k",
                    cache_path=str(teacher_out / "cache.sqlite"),
                ),
                output_dir=str(teacher_out),
            )
        )
    assert summary["complete"] and summary["generated"] == N_SCENES * len(TYPES)
    assert len(server.requests) == N_SCENES * len(TYPES)

    shards = tmp_path / "shards"
    manifest = convert(
        teacher_out / MIXED_FILE,
        world / "images",
        shards,
        samples_per_shard=8,
        tokenizer=load_tokenizer(str(world / "llm")),
        template="vicuna_v1",
        num_image_tokens=info["num_image_tokens"],
        max_length=cfg.llm_max_positions,
        num_threads=1,
        progress=False,
    )
    assert manifest.num_samples == N_SCENES * len(TYPES) and not manifest.skipped
    assert read_manifest(shards).num_samples == manifest.num_samples

    projector = trained_world["align"].parent / "projector.safetensors"
    outputs = tmp_path / "outputs"
    run_cfg = compose_train(
        [
            *trained_world["overrides"],
            "stage=finetune",
            f"paths.output_root={outputs}",
            f"data.sources=[{{path: {shards}, weight: 1.0}}]",
            "data.val_sources=null",
            "++callbacks.sample_answers=null",
            f"init_projector={projector}",
            "trainer.max_steps=3",
            # 18 samples in batches of 4 are 4 optimizer steps per epoch: max_steps ends the run.
            "global_batch_size=4",
            "micro_batch_size=4",
        ]
    )
    metrics = train(run_cfg)
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0
    checkpoint = outputs / "world" / "finetune" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert saved["llava_lit_config"]["data"]["sources"][0]["path"] == str(shards)
