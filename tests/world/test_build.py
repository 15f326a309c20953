"""The CI-sized build: every folder loads through the same `from_pretrained` paths a real checkpoint takes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from llava_lit.world.build import ensure_world, load_world_info

pytestmark = pytest.mark.slow


def test_layout_and_world_json(tiny_world, tiny_world_cfg):
    for rel in ["clip", "clip_full", "llm", "images/train", "images/val", "eval/images", "scenes"]:
        assert (tiny_world / rel).is_dir(), rel
    info = load_world_info(tiny_world)
    assert info["fingerprint"] == tiny_world_cfg.fingerprint()
    assert info["num_image_tokens"] == tiny_world_cfg.num_image_tokens == 49
    assert set(info["timings_s"]) == {
        "scenes + images",
        "records + questions",
        "tokenizer",
        "clip pretraining",
        "llm pretraining",
        "shards",
        "total",
    }
    assert set(info["metrics"]["clip"]["attribute_accuracy"]) == {"color", "shape", "position", "count"}
    llm = info["metrics"]["llm"]
    assert llm["heldout_perplexity"] < llm["heldout_perplexity_init"]


def test_clip_vision_tower_and_processor_load(tiny_world, tiny_world_cfg):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModel

    from llava_lit.world.backbones import normalize_images

    tower = CLIPVisionModel.from_pretrained(tiny_world / "clip")
    processor = CLIPImageProcessor.from_pretrained(tiny_world / "clip")
    img = Image.open(next((tiny_world / "images" / "train").glob("*.png"))).convert("RGB")
    pixels = processor(images=img, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, tiny_world_cfg.image_size, tiny_world_cfg.image_size)
    # The processor is a no-op resize at the world's size: what CLIP was trained on is what LLaVA sees.
    ours = normalize_images(torch.from_numpy(np.array(img))[None])
    assert torch.allclose(pixels, ours, atol=1e-2)
    out = tower(pixel_values=pixels, output_hidden_states=True)
    assert out.hidden_states[-2].shape == (
        1,
        1 + tiny_world_cfg.num_image_tokens,
        tiny_world_cfg.clip_hidden_size,
    )
    # The stand-alone tower holds the trained weights of the full CLIP's vision tower.
    full = CLIPModel.from_pretrained(tiny_world / "clip_full")
    with torch.no_grad():
        ref = full.vision_model(pixel_values=pixels).last_hidden_state
    assert torch.allclose(out.last_hidden_state, ref, atol=1e-5)


def test_llm_and_tokenizer_load(tiny_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from llava_lit.tokenization import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_world / "llm")
    assert isinstance(model, LlamaForCausalLM)
    tok = AutoTokenizer.from_pretrained(tiny_world / "llm")
    ids = tok("The red circle is on the left.").input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0
    assert tok.pad_token is None and "<image>" not in tok.get_vocab()
    assert tok.decode(ids, skip_special_tokens=True) == "The red circle is on the left."
    assert len(ids) < 12  # world words are single pieces, not byte fallback
    llava_tok = load_tokenizer(str(tiny_world / "llm"))
    added = [llava_tok.convert_tokens_to_ids("<image>"), llava_tok.pad_token_id]
    assert max(added) < model.config.vocab_size  # reserved rows: no resize needed
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)


def test_records_shards_and_eval_files(tiny_world, tiny_world_cfg):
    for name in ["align", "finetune", "val_align", "val_finetune"]:
        records = json.loads((tiny_world / "records" / f"{name}.json").read_text())
        for r in records:
            if "image" in r:
                assert (tiny_world / "images" / r["image"]).is_file()
        manifest = json.loads((tiny_world / "data" / name / "manifest.json").read_text())
        assert manifest["num_samples"] == len(records) and not manifest["skipped"]
        assert list((tiny_world / "data" / name).glob("shard-*.tar"))
    finetune = json.loads((tiny_world / "records" / "finetune.json").read_text())
    assert any("image" not in r for r in finetune)  # text-only samples are mixed in
    questions = [json.loads(x) for x in (tiny_world / "eval" / "questions.jsonl").read_text().splitlines()]
    gold = [json.loads(x) for x in (tiny_world / "eval" / "answers_gt.jsonl").read_text().splitlines()]
    assert len(questions) == len(gold) > 0
    train_images = {p.name for p in (tiny_world / "images" / "train").iterdir()}
    for q in questions:
        assert (tiny_world / "eval" / "images" / q["image"]).is_file()
        assert q["image"] not in train_images


def test_ensure_world_reuses_a_matching_build(tiny_world, tiny_world_cfg):
    stamp = (tiny_world / "world.json").stat().st_mtime_ns
    assert ensure_world(tiny_world, tiny_world_cfg) == tiny_world
    assert (tiny_world / "world.json").stat().st_mtime_ns == stamp


def test_refuses_to_replace_a_foreign_folder(tmp_path, tiny_world_cfg):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a world folder"):
        ensure_world(tmp_path / "mine", tiny_world_cfg)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_backbone_pretraining_is_deterministic(tiny_world, tiny_world_cfg):
    from transformers import AutoTokenizer

    from llava_lit.world.backbones import train_clip, train_llm
    from llava_lit.world.dialogues import lm_documents
    from llava_lit.world.scenes import generate_scene_sets, render_scene

    cfg = tiny_world_cfg
    tok = AutoTokenizer.from_pretrained(tiny_world / "llm")
    scenes = generate_scene_sets(cfg)["train"][:64]
    pixels = torch.from_numpy(np.stack([np.asarray(render_scene(s, cfg)) for s in scenes]))
    docs = lm_documents(scenes, cfg, random.Random(0))
    short = type(cfg)(**{**cfg.to_dict(), "clip_steps": 2, "llm_steps": 2, "clip_batch_size": 16})
    runs = [
        (
            train_clip(pixels, scenes, tok, short, lambda n=1: None)[0],
            train_llm(docs, docs, tok, short, lambda n=1: None)[0],
        )
        for _ in range(2)
    ]
    for a, b in zip(runs[0], runs[1], strict=True):
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), name


def test_text_qa_accuracy_scores_the_pretrained_lm(tiny_world, tiny_world_cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llava_lit.world.backbones import text_qa_accuracy
    from llava_lit.world.dialogues import QUESTION_TYPES
    from llava_lit.world.scenes import generate_scene_sets

    tok = AutoTokenizer.from_pretrained(tiny_world / "llm")
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "llm").eval()
    scenes = generate_scene_sets(tiny_world_cfg)["eval"][:10]
    side, pad = tok.padding_side, tok.pad_token
    acc = text_qa_accuracy(model, tok, scenes, tiny_world_cfg, batch_size=16)
    assert set(acc) <= {*QUESTION_TYPES, "overall"} and {"count", "overall"} <= set(acc)
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert (tok.padding_side, tok.pad_token) == (side, pad)  # the tokenizer is left as it was
    info = load_world_info(tiny_world)
    assert "overall" in info["metrics"]["llm"]["text_qa_accuracy"]


def test_save_llm_copies_tokenizer_files_only(tiny_world, tmp_path):
    # A folder holding both a tokenizer and an older model: the model saved elsewhere keeps its own weights.
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from llava_lit.world.backbones import save_llm

    model = AutoModelForCausalLM.from_pretrained(tiny_world / "llm")
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # now differs from the model saved in tiny_world/llm
    out = tmp_path / "llm"
    save_llm(model, tiny_world / "llm", out)
    saved = load_file(out / "model.safetensors")
    assert torch.equal(saved["lm_head.weight"], model.lm_head.weight)
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()


def test_llm_head_width_is_a_setting(tiny_world, tiny_world_cfg):
    from transformers import AutoTokenizer

    from llava_lit.world.backbones import train_llm

    tok = AutoTokenizer.from_pretrained(tiny_world / "llm")
    docs = ["The red circle is on the left.</s>" * 20]
    split = type(tiny_world_cfg)(**{**tiny_world_cfg.to_dict(), "llm_steps": 1, "llm_block_size": 16})
    wide = type(split)(**{**split.to_dict(), "llm_head_dim": 2 * split.llm_hidden_size // split.llm_heads})
    assert (split.llm_attention_head_dim, wide.llm_attention_head_dim) == (16, 32)  # hidden 64, 4 heads
    for cfg in (split, wide):
        model, _ = train_llm(docs, docs, tok, cfg, lambda n=1: None)
        attention = model.model.layers[0].self_attn
        assert attention.q_proj.out_features == cfg.llm_heads * cfg.llm_attention_head_dim
        assert attention.o_proj.in_features == cfg.llm_heads * cfg.llm_attention_head_dim
        assert model.config.hidden_size == cfg.llm_hidden_size


def test_highres_variant_reuses_backbones_and_draws_larger_scenes(tiny_world, tiny_world_cfg, tmp_path):
    """A world drawn at 3x the tower's input copies the source world's backbones (no pretraining) and is
    rebuilt when the source is; one without a source is refused."""
    import dataclasses

    from llava_lit.world.config import WorldConfig

    cfg = dataclasses.replace(
        tiny_world_cfg,
        render_scale=3,
        shape_sizes={"small": 0.037, "large": 0.05},
        max_objects=5,
        backbones_from=str(tiny_world),
    )
    out = ensure_world(tmp_path / "highres", cfg)
    info = load_world_info(out)
    assert info["metrics"]["backbones_from"]["fingerprint"] == load_world_info(tiny_world)["fingerprint"]
    assert "clip pretraining" not in info["timings_s"]
    image = Image.open(next((out / "images" / "train").iterdir()))
    assert image.size == (3 * tiny_world_cfg.image_size,) * 2
    for part in ("clip/model.safetensors", "llm/model.safetensors", "llm/tokenizer.model"):
        assert (out / part).read_bytes() == (tiny_world / part).read_bytes()
    assert cfg.fingerprint() != dataclasses.replace(cfg, backbones_from=str(tmp_path / "other")).fingerprint()
    assert WorldConfig().fingerprint() == WorldConfig(render_scale=1, backbones_from=None).fingerprint()
    with pytest.raises(ValueError, match="backbones_from"):
        dataclasses.replace(cfg, backbones_from=None).validate()
