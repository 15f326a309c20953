"""One-command build of the miniature world, cached by config fingerprint: `ensure_world(out_dir)`.

Layout of a built world (the training/eval configs depend on it):

    <out>/world.json                      config, fingerprint, per-step timings, backbone quality metrics
    <out>/images/{train,val}/*.png        rendered training/validation scenes
    <out>/scenes/{train,val,eval}.jsonl   ground truth of every scene
    <out>/records/{align,finetune,val_align,val_finetune}.json   LLaVA-format records (image paths
                                          relative to <out>/images/)
    <out>/data/{align,finetune,val_align,val_finetune}/          WebDataset shards + manifest.json
    <out>/clip/                           CLIPVisionModel + CLIPImageProcessor (save_pretrained)
    <out>/clip_full/                      the whole tiny CLIP (vision + text towers)
    <out>/llm/                            LlamaForCausalLM + its sentencepiece tokenizer (save_pretrained)
    <out>/eval/questions.jsonl            held-out questions, official format (question_id, image, text, category)
    <out>/eval/answers_gt.jsonl           gold answers and keys for `score.score_answers`
    <out>/eval/images/*.png               held-out scenes, never rendered for training

The build writes into a sibling temporary folder and renames it into place when complete, so an interrupted
build is never mistaken for a cached one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import CLIPVisionModel

from llava_lit.cpu_bf16 import has_native_bf16
from llava_lit.world.backbones import (
    clip_quality,
    patch_probe,
    save_clip,
    save_llm,
    text_qa_accuracy,
    train_clip,
    train_llm,
    train_tokenizer,
)
from llava_lit.world.config import WorldConfig
from llava_lit.world.dialogues import (
    align_record,
    eval_questions,
    exist_reading_records,
    finetune_records,
    lm_documents,
    text_only_records,
)
from llava_lit.world.scenes import Scene, blank_image, generate_scene_sets, render_scene

__all__ = ["WorldConfig", "blank_image", "build_world", "ensure_world", "load_world_info"]

log = logging.getLogger(__name__)

INFO_NAME = "world.json"


def load_world_info(out_dir: str | Path) -> dict | None:
    """The `world.json` of a built world, or None if there is none."""
    path = Path(out_dir) / INFO_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def ensure_world(out_dir: str | Path, cfg: WorldConfig | None = None) -> Path:
    """Return `out_dir` holding the world for `cfg` (default `WorldConfig()`), building it if missing or stale.

    A world is reused when its `world.json` fingerprint equals `cfg.fingerprint()`; otherwise it is rebuilt.
    Concurrent callers (e.g. several ranks) serialise on a lock file beside `out_dir`; all but the first
    find the finished world.
    """
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{out.name}.lock"):
        info = load_world_info(out)
        if info is not None and info.get("fingerprint") == cfg.fingerprint():
            return out
        if info is not None:
            log.warning(
                "world at %s was built for another config (%s); rebuilding", out, info.get("fingerprint")
            )
        return build_world(cfg, out)


def build_world(cfg: WorldConfig, out_dir: str | Path) -> Path:
    """Build the whole world for `cfg` into `out_dir` (replacing a previous world there); returns `out_dir`."""
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not (out / INFO_NAME).is_file() and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists and is not a world folder (no {INFO_NAME}); refusing to replace it"
        )
    if cfg.pretrain_bf16 and not has_native_bf16():
        log.warning(
            "pretrain_bf16 on a CPU without AMX or AVX512-BF16: bf16 is emulated here and slower than fp32"
        )
    tmp = out.parent / f".{out.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)
    try:
        info = _build(cfg, tmp)
    finally:
        torch.set_num_threads(threads)
    (tmp / INFO_NAME).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _build(cfg: WorldConfig, out: Path) -> dict:
    console = Console(stderr=True)
    timings: dict[str, float] = {}
    metrics: dict[str, dict] = {}
    rng = random.Random(cfg.seed)
    n_scenes = cfg.n_train_scenes + cfg.n_val_scenes + cfg.n_eval_scenes
    columns = [TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:

        @contextmanager
        def step(name: str, total: int):
            task = progress.add_task(name, total=total)
            start = time.perf_counter()
            yield lambda n=1: progress.advance(task, n)
            timings[name] = round(time.perf_counter() - start, 2)
            progress.update(task, completed=total)
            if not console.is_terminal:  # a live bar only renders on a terminal; logs get one line per step
                console.print(f"world build: {name} done in {timings[name]:.1f} s")

        with step("scenes + images", n_scenes) as advance:
            scenes = generate_scene_sets(cfg)
            pixels = {}
            for split, group in scenes.items():
                folder = out / ("eval/images" if split == "eval" else f"images/{split}")
                pixels[split] = _render_split(group, cfg, folder, advance)
                _write_jsonl(out / "scenes" / f"{split}.jsonl", [s.to_dict() for s in group])

        with step("records + questions", 4) as advance:
            records = _write_records(scenes, cfg, out / "records", rng)
            advance()
            questions, gold = eval_questions(scenes["eval"], cfg, rng)
            _write_jsonl(out / "eval" / "questions.jsonl", questions)
            _write_jsonl(out / "eval" / "answers_gt.jsonl", gold)
            advance()
            documents = None
            if not cfg.backbones_from:  # the LM's pretraining texts
                documents = lm_documents(scenes["train"], cfg, rng), lm_documents(scenes["eval"], cfg, rng)
            advance(2)

        if documents is None:
            with step("backbones (reused)", 1) as advance:
                metrics["backbones_from"] = _reuse_backbones(Path(cfg.backbones_from).expanduser(), out)
                advance()
        else:
            _pretrain_backbones(cfg, out, scenes, pixels, documents, metrics, step)

        with step("shards", len(records)) as advance:
            metrics["shards"] = _write_shards(records, cfg, out, advance)

    timings["total"] = round(sum(timings.values()), 2)
    console.print(f"[bold]world built[/bold] in {timings['total']:.0f} s")
    return {
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "num_image_tokens": cfg.num_image_tokens,
        "counts": {
            **{f"{k}_scenes": len(v) for k, v in scenes.items()},
            **{f"{k}_records": len(v) for k, v in records.items()},
            "eval_questions": len(questions),
        },
        "pretrain_precision": "bf16" if cfg.pretrain_in_bf16 else "fp32",
        "timings_s": timings,
        "metrics": metrics,
    }


def _reuse_backbones(source: Path, out: Path) -> dict:
    """Copy the tokenizer, CLIP and LLaMA of the built world at `source` into `out`."""
    info = load_world_info(source)
    if info is None:
        raise FileNotFoundError(
            f"backbones_from={source} is not a built world (no {INFO_NAME}); build it first with "
            f"`python -m llava_lit.world paths.world_dir={source}`"
        )
    for part in ("llm", "clip", "clip_full"):
        shutil.copytree(source / part, out / part)
    return {"path": str(source), "fingerprint": info.get("fingerprint")}


def _pretrain_backbones(
    cfg: WorldConfig,
    out: Path,
    scenes: dict[str, list[Scene]],
    pixels: dict[str, np.ndarray],
    documents: tuple[list[str], list[str]],
    metrics: dict[str, dict],
    step: Callable,
) -> None:
    """Train the world's tokenizer, CLIP and LLaMA from its scenes and texts (train, held-out), into `out`."""
    train_docs, heldout_docs = documents
    with step("tokenizer", 1) as advance:
        tok_dir = out / "llm"
        sentences = [p.strip() for d in train_docs for p in d.split("</s>") if p.strip()]
        tok = train_tokenizer(sentences, cfg, tok_dir)
        advance()

    with step("clip pretraining", cfg.clip_steps) as advance:
        clip, metrics["clip"] = train_clip(
            torch.from_numpy(pixels["train"]), scenes["train"], tok, cfg, advance
        )
        metrics["clip"].update(clip_quality(clip, torch.from_numpy(pixels["eval"]), scenes["eval"], tok, cfg))
        save_clip(clip, cfg, out / "clip", out / "clip_full")
        metrics["clip"]["patch_probe"] = _probe(out / "clip", pixels, scenes, cfg)

    with step("llm pretraining", cfg.llm_steps) as advance:
        llm, metrics["llm"] = train_llm(train_docs, heldout_docs, tok, cfg, advance)
        metrics["llm"]["text_qa_accuracy"] = text_qa_accuracy(llm, tok, scenes["eval"][:150], cfg)
        save_llm(llm, tok_dir, out / "llm")


def _probe(
    clip_dir: Path, pixels: dict[str, np.ndarray], scenes: dict[str, list[Scene]], cfg: WorldConfig
) -> dict:
    # Probe the saved tower (what LLaVA loads) and, as the baseline, a random-init tower of the same config.
    tower = CLIPVisionModel.from_pretrained(str(clip_dir)).eval()
    torch.manual_seed(cfg.seed)
    random_tower = CLIPVisionModel(tower.config).eval()
    n = min(1000, len(scenes["train"]))
    args = (
        torch.from_numpy(pixels["train"][:n]),
        scenes["train"][:n],
        torch.from_numpy(pixels["eval"]),
        scenes["eval"],
        cfg,
    )
    return {"pretrained": patch_probe(tower, *args), "random_init": patch_probe(random_tower, *args)}


def _render_split(scenes: list[Scene], cfg: WorldConfig, folder: Path, advance) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = np.empty((len(scenes), cfg.render_size, cfg.render_size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        img = render_scene(scene, cfg)
        img.save(folder / f"{scene.scene_id}.png", optimize=False)
        arrays[i] = np.asarray(img)
        advance()
    return arrays


def _write_records(
    scenes: dict[str, list[Scene]], cfg: WorldConfig, folder: Path, rng: random.Random
) -> dict:
    records: dict[str, list[dict]] = {}
    for split, prefix in [("train", ""), ("val", "val_")]:
        group = scenes[split]
        images = [f"{split}/{s.scene_id}.png" for s in group]
        records[f"{prefix}align"] = [
            align_record(s, img, rng, cfg.align_mixed_orders) for s, img in zip(group, images, strict=True)
        ]
        tuned = [r for s, img in zip(group, images, strict=True) for r in finetune_records(s, img, cfg, rng)]
        tuned += text_only_records(_share(len(tuned), cfg.text_only_fraction), cfg, rng)
        rng.shuffle(tuned)
        # Drawn from their own stream, so every other record and the held-out questions stay as they were.
        reading_rng = random.Random(f"{cfg.seed}-exist-reading-{split}")
        n_reading = _share(len(tuned), cfg.exist_reading_fraction)
        for r in exist_reading_records(group, n_reading, cfg, reading_rng):
            tuned.insert(reading_rng.randrange(len(tuned) + 1), r)
        for r in tuned:
            if "image" not in r:  # text-only ids are numbered per split: keep the two splits' ids apart
                r["id"] = f"{prefix}{r['id']}"
        records[f"{prefix}finetune"] = tuned
    folder.mkdir(parents=True, exist_ok=True)
    for name, recs in records.items():
        (folder / f"{name}.json").write_text(json.dumps(recs, indent=1))
    return records


def _share(n_others: int, fraction: float) -> int:
    """How many records to add to `n_others` so that the added ones make up `fraction` of all."""
    return round(n_others * fraction / (1 - fraction))


def _write_shards(records: dict[str, list[dict]], cfg: WorldConfig, out: Path, advance) -> dict:
    # Imported here: the converter pulls in the data pipeline, which the rest of the world build does not need.
    from llava_lit.convert import convert
    from llava_lit.tokenization import load_tokenizer

    tokenizer = load_tokenizer(
        str(out / "llm"), legacy=False
    )  # trained non-legacy (backbones.train_tokenizer)
    stats = {}
    for name, recs in records.items():
        manifest = convert(
            out / "records" / f"{name}.json",
            out / "images",
            out / "data" / name,
            samples_per_shard=cfg.samples_per_shard,
            tokenizer=tokenizer,
            template="plain" if name.endswith("align") else "vicuna_v1",
            num_image_tokens=cfg.num_image_tokens,
            max_length=cfg.llm_max_positions,
            source=name,
            num_threads=2,
            progress=False,
        )
        if manifest.skipped or manifest.num_samples != len(recs):
            raise RuntimeError(f"converter skipped world records of {name}: {manifest.skipped}")
        tl = manifest.token_lengths
        stats[name] = {
            "samples": manifest.num_samples,
            "shards": len(manifest.shards),
            "token_lengths": None if tl is None else dataclasses.asdict(tl),
        }
        advance(1)
    return stats


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
