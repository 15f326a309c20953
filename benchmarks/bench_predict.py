"""Predict throughput (questions/s) at batch sizes 1 and 16 on a tiny random LLaVA, on the CPU.

    .venv/bin/python benchmarks/bench_predict.py [--questions 32] [--max-new-tokens 16]

Builds the same tiny backbones as the tests (random-init CLIP 56 px + tiny LLaMA with the 32k tokenizer),
saves them as a training checkpoint, writes a question file over real sample photos, and times
`llava_lit.predict.predict` end to end on a fresh answer file per batch size, minus the separately timed model
load. Prints questions/s per batch size and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def build_checkpoint(root: Path) -> Path:
    """Tiny backbones in HF format plus a Lightning-style checkpoint of the LLaVA built from them."""
    import mistral_common
    from hydra.utils import instantiate
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from llava_lit.tokenization import load_tokenizer

    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        projection_dim=32,
    )
    CLIPVisionModel(vcfg).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(
        root / "clip"
    )
    lcfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(lcfg).save_pretrained(root / "llm")
    shutil.copy(
        Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", root / "llm" / "tokenizer.model"
    )
    config = {
        "run_name": "bench",
        "stage": {"name": "finetune"},
        "model": {
            "_target_": "llava_lit.model.build_llava",
            "_convert_": "all",
            "projector": "mlp2x_gelu",
            "vision_tower": {"name_or_path": str(root / "clip")},
            "language_model": {"name_or_path": str(root / "llm")},
        },
        "data": {"template": "vicuna_v1", "image_aspect": "pad", "max_length": 512},
    }
    model = instantiate(config["model"], tokenizer=load_tokenizer(str(root / "llm")))
    state = {"model." + k: v for k, v in model.state_dict().items()}
    path = root / "bench.ckpt"
    torch.save({"state_dict": state, "llava_lit_config": config}, path)
    return path


def write_questions(root: Path, n: int) -> tuple[Path, Path]:
    """`n` questions over crops of scikit-image's sample photos, a quarter of them text-only."""
    from PIL import Image
    from skimage import data

    images = root / "images"
    images.mkdir()
    photo = data.astronaut()
    rows = []
    for i in range(n):
        question = {"question_id": i, "text": f"Question {i}: what do you see in this part of the picture?"}
        if i % 4:
            buf = io.BytesIO()
            x, y = (i * 29) % 400, (i * 41) % 400
            Image.fromarray(photo[y : y + 100, x : x + 80]).save(buf, format="PNG")
            (images / f"{i}.png").write_bytes(buf.getvalue())
            question["image"] = f"{i}.png"
        rows.append(question)
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return questions, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    from llava_lit.predict import predict

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = build_checkpoint(root)
        questions, images = write_questions(root, args.questions)
        results = {}
        for batch_size in (1, 16):
            # Each run includes loading the checkpoint and starting Lightning; the load is timed apart below.
            start = time.perf_counter()
            predict(
                questions,
                images,
                root / f"answers_{batch_size}.jsonl",
                checkpoint=checkpoint,
                batch_size=batch_size,
                max_new_tokens=args.max_new_tokens,
                accelerator="cpu",
            )
            total = time.perf_counter() - start
            results[batch_size] = total
        load = _load_time(checkpoint)
        print(
            f"torch threads: {torch.get_num_threads()}; {args.questions} questions; "
            f"max_new_tokens {args.max_new_tokens}; model load ~{load:.2f} s (subtracted)"
        )
        rates = {}
        for batch_size, total in results.items():
            rates[batch_size] = args.questions / max(total - load, 1e-6)
            print(f"batch_size={batch_size:>2}: {total:6.2f} s total, {rates[batch_size]:7.2f} questions/s")
        print(f"speed-up batch 16 / batch 1: {rates[16] / rates[1]:.2f}x")


def _load_time(checkpoint: Path) -> float:
    from llava_lit.inference import load_for_inference

    start = time.perf_counter()
    load_for_inference(checkpoint)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
