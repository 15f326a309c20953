"""Inference and batched prediction from model folders: our transformers export and an official LLaVA folder.

A tiny model is saved as a training checkpoint, exported with `python -m llava_lit.export`, and the same question
file is answered from both; greedy answers must be identical. An official-format folder (which records no chat
template) loads with `vicuna_v1` by default, says so in the log, and gives the original model's answers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference_helpers import write_official
from llava_lit.export import main as export_main
from llava_lit.hydra_app import compose_config
from llava_lit.inference import load_for_inference
from llava_lit.predict import predict


def _png(seed: int, size: tuple[int, int]) -> bytes:
    """A crop of a scikit-image sample photo, shifted by `seed`."""
    from PIL import Image
    from skimage import data

    photo = data.astronaut()  # [512, 512, 3] uint8
    x, y = (seed * 37) % (512 - size[0]), (seed * 53) % (512 - size[1])
    buf = io.BytesIO()
    Image.fromarray(photo[y : y + size[1], x : x + size[0]]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _import_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Imported backbone configs are written under the llava_lit cache: keep them inside the test's folder.
    monkeypatch.setenv("LLAVA_LIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def trained_checkpoint(make_tiny, tiny_run_config: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Lightning-style checkpoint of a tiny model whose projector is large enough for images to matter."""
    model = make_tiny(seed=21)
    with torch.no_grad():
        for param in model.projector.parameters():
            param.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("trained") / "last.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "llava_lit_config": tiny_run_config, "global_step": 1}, path)
    return path


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four image questions (square and non-square pictures, so padding matters) and a text-only one."""
    root = tmp_path_factory.mktemp("questions")
    (root / "images").mkdir()
    sizes = [(64, 48), (56, 56), (40, 90), (120, 80)]
    rows = []
    for i, size in enumerate(sizes):
        (root / "images" / f"{i}.png").write_bytes(_png(i, size))
        rows.append({"question_id": i, "image": f"{i}.png", "text": f"What is in picture {i}?"})
    rows.append({"question_id": "text", "text": "Name three colors."})
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "questions.jsonl", root / "images"


def _answers(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {str(r["question_id"]): r["text"] for r in rows}


def test_exported_folder_predicts_like_its_checkpoint(
    trained_checkpoint: Path, questions: tuple[Path, Path], tmp_path: Path
) -> None:
    exported = export_main(
        compose_config("export", [f"checkpoint={trained_checkpoint}", f"out={tmp_path / 'hf'}"])
    )
    bundle = load_for_inference(exported)
    assert bundle.template.name == "vicuna_v1" and bundle.image_loader.aspect == "pad"
    assert bundle.model_id == "hf"

    question_file, images = questions
    settings = {"batch_size": 3, "max_new_tokens": 8, "accelerator": "cpu"}
    from_ckpt = predict(
        question_file, images, tmp_path / "ckpt.jsonl", checkpoint=trained_checkpoint, **settings
    )
    from_hf = predict(question_file, images, tmp_path / "hf.jsonl", checkpoint=exported, **settings)
    expected = _answers(from_ckpt)
    assert len(expected) == 5 and all(expected.values())
    assert len({expected[i] for i in ("0", "1", "2", "3")}) > 1, "answers must depend on the image"
    assert _answers(from_hf) == expected

    # The recorded template wins; a contradicting one is refused rather than silently used.
    with pytest.raises(ValueError, match="vicuna_v1"):
        load_for_inference(exported, template="chatml")


def test_official_folder_defaults_to_vicuna_and_says_so(
    make_tiny,
    tiny_backbones: Path,
    llama_tokenizer_dir: Path,
    questions: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = make_tiny(seed=9)
    with torch.no_grad():
        for param in original.projector.parameters():
            param.normal_(0.0, 0.5)
    folder = write_official(
        original, tmp_path / "official", tiny_backbones, llama_tokenizer_dir, with_tower=True
    )
    run_config = {
        "model": {
            "_target_": "llava_lit.model.build_llava",
            "vision_tower": {"name_or_path": str(tiny_backbones / "clip")},
            "projector": "mlp2x_gelu",
            "language_model": {"name_or_path": str(tiny_backbones / "llm")},
            "tokenizer_name_or_path": str(tiny_backbones / "llm"),
        },
        "data": {"template": "vicuna_v1", "image_aspect": "pad"},
        "run_name": "original",
    }
    checkpoint = tmp_path / "original.ckpt"
    state = {f"model.{k}": v for k, v in original.state_dict().items()}
    torch.save({"state_dict": state, "llava_lit_config": run_config}, checkpoint)

    with caplog.at_level(logging.INFO, logger="llava_lit.inference.loading"):
        bundle = load_for_inference(folder)
    assert bundle.template.name == "vicuna_v1" and bundle.image_loader.aspect == "pad"
    assert any(
        "records no chat template" in r.getMessage() and "vicuna_v1" in r.getMessage() for r in caplog.records
    )
    assert load_for_inference(folder, template="llama_2").template.name == "llama_2"

    question_file, images = questions
    settings = {"batch_size": 5, "max_new_tokens": 6, "accelerator": "cpu"}
    expected = _answers(
        predict(question_file, images, tmp_path / "a.jsonl", checkpoint=checkpoint, **settings)
    )
    assert (
        _answers(predict(question_file, images, tmp_path / "b.jsonl", checkpoint=folder, **settings))
        == expected
    )


@pytest.mark.slow
def test_predict_command_line_with_exported_folder(
    trained_checkpoint: Path, questions: tuple[Path, Path], tmp_path: Path
) -> None:
    exported = export_main(
        compose_config(
            "export", [f"checkpoint={trained_checkpoint}", f"out={tmp_path / 'hf'}", "verify=false"]
        )
    )
    question_file, images = questions
    answers = tmp_path / "cli.jsonl"
    env = {
        **os.environ,
        "LLAVA_LIT_OUTPUTS": str(tmp_path / "outputs"),
        "LLAVA_LIT_CACHE": str(tmp_path / "c"),
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llava_lit.predict",
            f"checkpoint={exported}",
            f"questions_file={question_file}",
            f"image_folder={images}",
            f"answers_file={answers}",
            "max_new_tokens=8",
            "accelerator=cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reference = predict(
        question_file, images, tmp_path / "ref.jsonl", checkpoint=trained_checkpoint, max_new_tokens=8
    )
    assert _answers(answers) == _answers(reference)
