"""Pretraining of the miniature backbones on the world: tokenizer, tiny CLIP (contrastive), tiny LLaMA (causal LM).

They stand in for `openai/clip-vit-large-patch14-336` and Vicuna/LLaMA, which cannot be downloaded here, and
are saved in the same formats so the LLaVA loads them through the ordinary `from_pretrained` paths. Each
trainer also measures what its model learned on held-out scenes, for `world.json`.
"""

from __future__ import annotations

import io
import math
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from llava_lit.conversation import get_template
from llava_lit.world.config import WorldConfig
from llava_lit.world.dialogues import QUESTION_TYPES, all_qas, caption, object_phrase
from llava_lit.world.scenes import SLOTS, Scene, SceneObject
from llava_lit.world.score import is_correct

Progress = Callable[[int], None]
"""Called with the number of steps just completed (drives the build's progress bar)."""


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], cfg: WorldConfig, out_dir: Path) -> PreTrainedTokenizerBase:
    """Train a LLaMA-style sentencepiece BPE (byte fallback, <unk>/<s>/</s> = 0/1/2, no pad) and save it.

    `out_dir` receives `tokenizer.model` plus the `save_pretrained` files, so both `AutoTokenizer` and
    sentencepiece-based loaders read it. `<image>`/`<pad>` are not added: the project's loader adds them.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=cfg.tokenizer_vocab_size,
        hard_vocab_limit=False,  # the world's language is small; take what it supports up to the bound
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer.from_pretrained(str(out_dir), legacy=False, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(str(out_dir))
    return tok


# ---------------------------------------------------------------- images


def image_processor(cfg: WorldConfig) -> CLIPImageProcessor:
    """The CLIP image processor for the world's images: no-op resize/crop at `image_size`, CLIP normalisation."""
    side = cfg.image_size
    return CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] normalised exactly as `image_processor` does at native size."""
    x = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- CLIP


def hard_negative(
    scene: Scene,
    cfg: WorldConfig,
    rng: random.Random,
    choices: tuple[str, ...] = ("color", "shape", "position", "count"),
) -> tuple[str, Scene]:
    """A caption that differs from the scene's in one attribute: color, shape, position or count.

    Returns (attribute, altered scene). Used as the extra negative of each image in CLIP training (so every
    attribute must be encoded) and to measure per-attribute zero-shot accuracy.
    """
    objs = list(scene.objects)
    while True:
        attr = rng.choice(choices)
        i = rng.randrange(len(objs))
        o = objs[i]
        if attr == "color":
            free = sorted(set(cfg.palette) - {x.color for x in objs})
            new = [SceneObject(o.shape, rng.choice(free), o.size, o.position, o.cx, o.cy)] if free else None
        elif attr == "shape":
            new = [
                SceneObject(
                    rng.choice([s for s in cfg.shapes if s != o.shape]),
                    o.color,
                    o.size,
                    o.position,
                    o.cx,
                    o.cy,
                )
            ]
        elif attr == "position":
            free = sorted(set(SLOTS) - {x.position for x in objs})
            new = [SceneObject(o.shape, o.color, o.size, rng.choice(free), o.cx, o.cy)] if free else None
        else:  # count: drop an object, or add one when there is only one
            if len(objs) > 1:
                new = []
            else:
                color = rng.choice(sorted(set(cfg.palette) - {o.color}))
                slot = rng.choice(sorted(set(SLOTS) - {o.position}))
                new = [o, SceneObject(rng.choice(cfg.shapes), color, o.size, slot, 0.0, 0.0)]
        if new is None:
            continue
        altered = Scene(
            scene.scene_id, scene.background, scene.background_rgb, tuple(objs[:i] + new + objs[i + 1 :])
        )
        return attr, altered


def _clip_text_ids(texts: list[str], tok: PreTrainedTokenizerBase, eot_id: int, max_len: int) -> torch.Tensor:
    # CLIP pools the text at its end-of-text token; ours is one id past the LM vocabulary (as CLIP's own EOT
    # is its largest id), so the text tower never confuses it with a word. Pad with 0 after it.
    rows = [ids[: max_len - 1] + [eot_id] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)  # padded to the batch's longest
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _clip_features(
    model: CLIPModel, pixels: torch.Tensor | None = None, ids: torch.Tensor | None = None
) -> torch.Tensor:
    if pixels is not None:
        out = model.get_image_features(pixel_values=pixels)
    else:
        out = model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(feats, dim=-1)


def patch_under(obj: SceneObject, grid: int) -> int:
    """Row-major index of the patch (CLS excluded) under the object's centre on a `grid` x `grid` tower."""
    return min(int(obj.cy * grid), grid - 1) * grid + min(int(obj.cx * grid), grid - 1)


def _object_patches(scenes: list[Scene], grid: int) -> tuple[list[int], list[int], list[SceneObject]]:
    # (image row, patch under the object's centre, object) for every object of the batch.
    rows, patches, objs = [], [], []
    for b, scene in enumerate(scenes):
        for o in scene.objects:
            rows.append(b)
            patches.append(patch_under(o, grid))
            objs.append(o)
    return rows, patches, objs


def train_clip(
    images: torch.Tensor,
    scenes: list[Scene],
    tok: PreTrainedTokenizerBase,
    cfg: WorldConfig,
    progress: Progress,
) -> tuple[CLIPModel, dict]:
    """Contrastive pretraining: the CLIP loss (plus one-attribute-off captions as extra negatives) and a
    region-phrase loss that grounds each object's patch token in the phrase naming it.

    The CLIP loss reaches the patch tokens only through the pooled embedding, where an object of 1-2 patches
    is a small part of the image: trained on it alone, the tiny tower's patch tokens barely tell a circle from a
    square (`docs/benchmarks.md`). LLaVA reads exactly those tokens, so the region-phrase loss (as in
    grounded pretraining, GLIP/RegionCLIP) contrasts the token under each object's centre, at the layer LLaVA
    reads (`hidden_states[-2]`), with the text embeddings of every phrase the world can name ("a red circle on
    the left"), weighted by `cfg.clip_region_weight`.

    `images`: uint8 [N, H, W, 3] of `scenes`. Returns the model and its loss curve summary.
    """
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed + 1)
    vocab = len(tok)
    max_len = 48
    h = cfg.clip_hidden_size
    grid = cfg.patch_grid
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab + 1,
            hidden_size=h,
            intermediate_size=2 * h,
            num_hidden_layers=max(1, cfg.clip_layers // 2),
            num_attention_heads=cfg.clip_heads,
            max_position_embeddings=max_len,
            bos_token_id=tok.bos_token_id,
            eos_token_id=vocab,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=h,
            intermediate_size=2 * h,
            num_hidden_layers=cfg.clip_layers,
            num_attention_heads=cfg.clip_heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        ),
        projection_dim=h,
        attn_implementation="eager",  # not saved: LLaVA loads the tower with its own choice
    )
    model = CLIPModel(config)
    _init_2d_positions(model.vision_model.embeddings.position_embedding.weight, grid)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    sched = _warmup_cosine(opt, cfg.clip_steps)
    captions = [caption(s) for s in scenes]
    phrases = sorted(object_phrase(c, s, p) for c in cfg.palette for s in cfg.shapes for p in SLOTS)
    phrase_ids = _clip_text_ids(phrases, tok, vocab, max_len)
    phrase_index = {p: i for i, p in enumerate(phrases)}
    losses, region_losses = [], []
    model.train()
    for _ in range(cfg.clip_steps):
        idx = rng.sample(range(len(scenes)), k=min(cfg.clip_batch_size, len(scenes)))
        # Two extra negatives per image: one position-or-shape change (what CLIP learns slowest: binding an
        # attribute to an object) and one change of any attribute.
        negatives = [caption(hard_negative(scenes[i], cfg, rng, ("position", "shape"))[1]) for i in idx]
        negatives += [caption(hard_negative(scenes[i], cfg, rng)[1]) for i in idx]
        ids = _clip_text_ids([captions[i] for i in idx] + negatives, tok, vocab, max_len)
        with _autocast(cfg):
            vision = model.vision_model(pixel_values=normalize_images(images[idx]), output_hidden_states=True)
            img = F.normalize(model.visual_projection(vision.pooler_output), dim=-1)  # [B, P]
            txt = _clip_features(model, ids=ids)  # [3B, P]: positives then hard negatives
            scale = model.logit_scale.exp().clamp(max=100)
            logits = scale * img @ txt.T  # [B, 3B]
            target = torch.arange(len(idx))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(idx)].T, target)) / 2
            if cfg.clip_region_weight:
                rows, patches, objs = _object_patches([scenes[i] for i in idx], grid)
                tokens = vision.hidden_states[-2][:, 1:][rows, patches]  # [O, h]: each object's centre patch
                region = F.normalize(
                    model.visual_projection(model.vision_model.post_layernorm(tokens)), dim=-1
                )
                named = _clip_features(model, ids=phrase_ids)  # [phrases, P]
                labels = torch.tensor(
                    [phrase_index[object_phrase(o.color, o.shape, o.position)] for o in objs]
                )
                region_loss = F.cross_entropy(scale * region @ named.T, labels)
                region_losses.append(region_loss.item())
                loss = loss + cfg.clip_region_weight * region_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress(1)
    model.eval()
    summary = {"loss_first": _mean(losses[:10]), "loss_last": _mean(losses[-10:])}
    if region_losses:
        summary |= {
            "region_loss_first": _mean(region_losses[:10]),
            "region_loss_last": _mean(region_losses[-10:]),
        }
    return model, summary


@torch.no_grad()
def _init_2d_positions(weight: torch.Tensor, grid: int) -> None:
    """Start the vision tower's position embeddings as 2-D sin-cos codes (CLS row zero) at unit scale.

    The default init (std 0.02) is ~20x weaker than the patch content, and a tiny tower trained for a few
    hundred steps never learns to tell where an object is; with a 2-D code it can from the start.
    """
    dim = weight.shape[1]
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    ang_y, ang_x = ys.reshape(-1, 1) * freqs, xs.reshape(-1, 1) * freqs  # [grid*grid, quarter]
    codes = torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)  # [grid*grid, 4*quarter]
    weight.zero_()
    weight[1:, : codes.shape[1]] = codes


@torch.no_grad()
def clip_quality(
    model: CLIPModel,
    images: torch.Tensor,
    scenes: list[Scene],
    tok: PreTrainedTokenizerBase,
    cfg: WorldConfig,
) -> dict:
    """Zero-shot quality on held-out scenes.

    - `attribute_accuracy[attr]`: how often the true caption outscores a caption with one `attr` changed
      (chance 0.5) -- shows the tower encodes color, shape, position and count.
    - `retrieval_top1`: image -> caption top-1 among all held-out captions (chance 1/N).
    """
    rng = random.Random(cfg.seed + 2)
    vocab = len(tok)
    img = torch.cat(
        [
            _clip_features(model, pixels=normalize_images(images[i : i + 256]))
            for i in range(0, len(images), 256)
        ]
    )
    txt = _clip_features(model, ids=_clip_text_ids([caption(s) for s in scenes], tok, vocab, 48))
    sims = img @ txt.T  # [N, N]
    retrieval = (sims.argmax(1) == torch.arange(len(scenes))).float().mean().item()
    hits: dict[str, list[float]] = {a: [] for a in ["color", "shape", "position", "count"]}
    for _ in range(4):  # several distractors per image
        pairs = [hard_negative(s, cfg, rng) for s in scenes]
        neg = _clip_features(model, ids=_clip_text_ids([caption(p[1]) for p in pairs], tok, vocab, 48))
        wins = (sims.diagonal() > (img * neg).sum(-1)).float()
        for (attr, _), w in zip(pairs, wins.tolist(), strict=True):
            hits[attr].append(w)
    return {
        "retrieval_top1": round(retrieval, 4),
        "retrieval_chance": round(1 / len(scenes), 4),
        "attribute_accuracy": {a: round(_mean(v), 4) for a, v in hits.items()},
        "attribute_chance": 0.5,
    }


@torch.no_grad()
def _patch_features(tower: CLIPVisionModel, images: torch.Tensor) -> torch.Tensor:
    # What LLaVA feeds its projector: penultimate layer, CLS dropped. [N, num_patches, hidden]
    chunks = []
    for i in range(0, len(images), 256):
        out = tower(pixel_values=normalize_images(images[i : i + 256]), output_hidden_states=True)
        chunks.append(out.hidden_states[-2][:, 1:])
    return torch.cat(chunks)


def _probe_data(
    feats: torch.Tensor, scenes: list[Scene], cfg: WorldConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    grid = cfg.patch_grid
    colors, shapes = sorted(cfg.palette), list(cfg.shapes)
    x_obj, y_color, y_shape = [], [], []
    for n, scene in enumerate(scenes):
        for o in scene.objects:
            x_obj.append(feats[n, patch_under(o, grid)])
            y_color.append(colors.index(o.color))
            y_shape.append(shapes.index(o.shape))
    counts = torch.tensor([len(s.objects) - 1 for s in scenes])
    return {
        "color": (torch.stack(x_obj), torch.tensor(y_color)),
        "shape": (torch.stack(x_obj), torch.tensor(y_shape)),
        "count": (feats.mean(1), counts),
    }


def _linear_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor
) -> float:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(x_train), y_train) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (probe(x_test).argmax(1) == y_test).float().mean().item()


def patch_probe(
    tower: CLIPVisionModel,
    train_images: torch.Tensor,
    train_scenes: list[Scene],
    test_images: torch.Tensor,
    test_scenes: list[Scene],
    cfg: WorldConfig,
) -> dict[str, float]:
    """Linear-probe accuracy on the features LLaVA uses (penultimate layer, patch tokens), held-out scenes.

    color/shape: from the patch under each object's centre; count: from the mean of all patches. (Position
    needs no probe there: it is which of the patch tokens carries the object.) Compare with the same probe on
    a random-init tower of the same shape to see what pretraining added.
    """
    train = _probe_data(_patch_features(tower, train_images), train_scenes, cfg)
    test = _probe_data(_patch_features(tower, test_images), test_scenes, cfg)
    return {k: round(_linear_probe(*train[k], *test[k]), 4) for k in train}


def save_clip(model: CLIPModel, cfg: WorldConfig, clip_dir: Path, full_dir: Path) -> None:
    """Save the full CLIP to `full_dir`, and its vision tower as a `CLIPVisionModel` + image processor to `clip_dir`."""

    model.save_pretrained(str(full_dir))
    # The vision tower alone, as a stand-alone CLIPVisionModel (what openai/clip-vit-* loads as in LLaVA).
    vision = CLIPVisionModel(model.config.vision_config)
    vision.load_state_dict(model.vision_model.state_dict())
    vision.save_pretrained(str(clip_dir))
    image_processor(cfg).save_pretrained(str(clip_dir))


# ---------------------------------------------------------------- LLaMA


def _token_blocks(texts: list[str], tok: PreTrainedTokenizerBase, block: int) -> torch.Tensor:
    stream: list[int] = []
    for ids in tok(texts)["input_ids"]:  # BOS first; "</s>" inside the texts becomes EOS
        stream.extend(ids)
    n = len(stream) // block
    if n == 0:
        raise ValueError(f"LM corpus of {len(stream)} tokens is shorter than one block of {block}")
    return torch.tensor(stream[: n * block]).view(n, block)


def train_llm(
    train_texts: list[str],
    heldout_texts: list[str],
    tok: PreTrainedTokenizerBase,
    cfg: WorldConfig,
    progress: Progress,
) -> tuple[LlamaForCausalLM, dict]:
    """Causal-LM pretraining on the world's text (packed blocks); returns the model and held-out perplexity.

    The vocabulary is rounded up (to a multiple of 64, at least 2 spare rows) so the LLaVA's added `<image>`
    and `<pad>` tokens fit without changing the pretrained rows.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    h = cfg.llm_hidden_size
    config = LlamaConfig(
        vocab_size=int(math.ceil((len(tok) + 2) / 64) * 64),
        hidden_size=h,
        intermediate_size=int(h * 2.75) // 16 * 16,
        num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads,
        num_key_value_heads=cfg.llm_heads,
        head_dim=cfg.llm_attention_head_dim,
        max_position_embeddings=cfg.llm_max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation="eager",  # not saved: the LLaVA picks its own (conf/model/tiny.yaml)
    )
    model = LlamaForCausalLM(config)
    train = _token_blocks(train_texts, tok, cfg.llm_block_size)
    heldout = _token_blocks(heldout_texts, tok, cfg.llm_block_size)
    ppl_before = _perplexity(model, heldout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.llm_lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = _warmup_cosine(opt, cfg.llm_steps)
    losses = []
    model.train()
    for _ in range(cfg.llm_steps):
        idx = torch.randint(len(train), (cfg.llm_batch_size,), generator=gen)
        batch = train[idx]  # [B, T]
        with _autocast(cfg):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress(1)
    model.eval()
    return model, {
        "loss_first": _mean(losses[:10]),
        "loss_last": _mean(losses[-10:]),
        "heldout_perplexity_init": round(ppl_before, 3),
        "heldout_perplexity": round(_perplexity(model, heldout), 3),
        "train_tokens": int(train.numel()),
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tok),
    }


@torch.no_grad()
def text_qa_accuracy(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerBase,
    scenes: list[Scene],
    cfg: WorldConfig,
    batch_size: int = 64,
) -> dict[str, float]:
    """Greedy accuracy of the LM on held-out questions whose scene is given as its caption, in text.

    The prompt is a stage-2 prompt with the caption standing where the image will be, so this measures the
    reading skill stage 2 relies on (look up an object's attribute, count, compare positions) before any image
    is involved. Scored by `score.is_correct`, as the image evaluation is. Keys: question types and `overall`.
    """
    rng = random.Random(cfg.seed + 4)
    template = get_template("vicuna_v1")  # the stage-2 template
    items = []
    for scene in scenes:
        for category, qas in all_qas(scene, cfg, rng).items():
            if qas:
                qa = rng.choice(qas)
                turn = {"role": "user", "content": f"{caption(scene)}\n{qa.question}"}
                prompt = template.render([turn], add_generation_prompt=True).text
                gold = {"category": category, "key": qa.key, "candidates": list(qa.candidates)}
                items.append((category, prompt, gold))
    side, pad = tok.padding_side, tok.pad_token
    tok.padding_side = "left"  # generation continues every row from its last prompt token
    tok.pad_token = tok.pad_token or tok.eos_token
    hits: dict[str, list[float]] = {t: [] for t in QUESTION_TYPES}
    try:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            enc = tok([p for _, p, _ in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
            answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for (category, _, gold), answer in zip(chunk, answers, strict=True):
                hits[category].append(float(is_correct(gold, answer)))
    finally:
        tok.padding_side, tok.pad_token = side, pad
    result = {t: _mean(v) for t, v in hits.items() if v}
    result["overall"] = _mean([h for v in hits.values() for h in v])
    return result


def save_llm(model: LlamaForCausalLM, tok_dir: Path, llm_dir: Path) -> None:
    """Save the LM with `save_pretrained`, with its tokenizer files (incl. `tokenizer.model`) beside it.

    Only tokenizer files are copied from `tok_dir`: a model saved there before must not overwrite this one.
    """
    model.save_pretrained(str(llm_dir))
    if tok_dir.resolve() != llm_dir.resolve():
        for f in tok_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "added_tokens.json"):
                shutil.copy(f, llm_dir / f.name)


@torch.no_grad()
def _perplexity(model: LlamaForCausalLM, blocks: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks[:64].split(16)]
    model.train(was_training)
    return float(math.exp(_mean(losses)))


# ---------------------------------------------------------------- shared


def _warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _autocast(cfg: WorldConfig) -> torch.autocast:
    """bf16 autocast of a pretraining forward pass (and its loss) when `cfg.pretrain_in_bf16`, else a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.pretrain_in_bf16)


def _mean(xs: list[float]) -> float:
    return round(float(np.mean(xs)), 4) if xs else float("nan")


def scratch_dir() -> Path:
    """A temporary folder for intermediate tokenizer files."""
    return Path(tempfile.mkdtemp(prefix="llava_world_"))
