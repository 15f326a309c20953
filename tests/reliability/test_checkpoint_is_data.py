"""A checkpoint or model folder from a stranger is data: nothing it names is ever run.

Each test plants a Hydra `_target_` that would create a marker folder if it were instantiated (as loading did
before settings read from files were checked), then drives a real entry point with it: the command-line tools
(`predict`, `chat`, `serve`, `export`, `train init_from=`), the evaluation front end, and the loaders behind
them for every source kind (checkpoint file, FSDP2 checkpoint folder, official folder, transformers folder,
hub id). Every one must refuse with an error that names the setting, and the marker must not exist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference_helpers import save_checkpoint, tiny_run_config
from llava_lit.checkpoint_reader import read_checkpoint
from llava_lit.inference import load_for_inference
from llava_lit.untrusted import ConfigRefused

REPO = Path(__file__).resolve().parents[2]


def payload(marker: Path) -> dict:
    """A node that creates `marker` when Hydra instantiates it."""
    return {"_target_": "os.makedirs", "name": str(marker), "exist_ok": True}


def evil_run_config(backbones: Path, marker: Path, where: str) -> dict:
    """A tiny run config with the payload planted at `where`."""
    config = tiny_run_config(backbones)
    model = config["model"]
    if where == "projector":
        model["projector"] = payload(marker)
    elif where == "vision_tower":
        model["vision_tower"]["timm_kwargs"] = {"pretrained_cfg": payload(marker)}
    elif where == "language_model":
        model["language_model"]["config_path"] = payload(marker)
    elif where == "target":
        model["_target_"] = "builtins.exec"
    elif where == "interpolation":
        model["language_model"]["name_or_path"] = "${oc.env:HOME}"
    elif where == "data":
        config["data"]["template"] = payload(marker)
    else:
        raise ValueError(where)
    return config


@pytest.fixture(scope="module")
def weights(tiny_backbones: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The `state_dict` of a genuine tiny checkpoint (the planted configs reuse it)."""
    path = save_checkpoint(tmp_path_factory.mktemp("genuine") / "last.ckpt", tiny_run_config(tiny_backbones))
    return torch.load(path, weights_only=True)["state_dict"]


def evil_checkpoint(path: Path, weights: dict, config: dict) -> Path:
    torch.save({"state_dict": weights, "llava_lit_config": config, "global_step": 1}, path)
    return path


@pytest.mark.parametrize(
    "where", ["projector", "vision_tower", "language_model", "target", "interpolation", "data"]
)
def test_a_checkpoint_file_with_a_target_is_refused(where, tiny_backbones, weights, tmp_path):
    marker = tmp_path / "ran"
    ckpt = evil_checkpoint(tmp_path / "evil.ckpt", weights, evil_run_config(tiny_backbones, marker, where))
    with pytest.raises(ConfigRefused) as err:
        load_for_inference(ckpt)
    assert str(ckpt) in str(err.value)
    assert not marker.exists()


def test_a_distributed_checkpoint_folder_with_a_target_is_refused(tiny_backbones, tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")  # never read: the config is checked before any shard
    torch.save({"llava_lit_config": evil_run_config(tiny_backbones, marker, "projector")}, folder / "meta.pt")
    with pytest.raises(ConfigRefused, match=r"model\.projector\._target_"):
        load_for_inference(folder)
    assert not marker.exists()


def _official_folder(tiny_backbones: Path, folder: Path, **fields) -> Path:
    """A stage-1 style official folder (config.json + mm_projector.bin) with `fields` in its config."""
    folder.mkdir(parents=True)
    config = {
        "model_type": "llava_llama",
        "_name_or_path": str(tiny_backbones / "llm"),
        "mm_vision_tower": str(tiny_backbones / "clip"),
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        **fields,
    }
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"model.mm_projector.0.weight": torch.zeros(64, 32)}, folder / "mm_projector.bin")
    return folder


@pytest.mark.parametrize("field", ["mm_projector_type", "mm_vision_tower", "mm_vision_select_layer"])
def test_an_official_folder_with_a_target_is_refused(field, tiny_backbones, tmp_path):
    marker = tmp_path / "ran"
    folder = _official_folder(tiny_backbones, tmp_path / "official", **{field: payload(marker)})
    with pytest.raises(ConfigRefused, match=f"{field}._target_"):
        read_checkpoint(folder, workdir=tmp_path / "work")
    assert not marker.exists()


def test_a_transformers_folder_with_a_target_is_refused(tiny_backbones, weights, tmp_path):
    from llava_lit.interop.export_hf import export_hf_llava

    genuine = load_for_inference(
        evil_checkpoint(tmp_path / "genuine.ckpt", weights, tiny_run_config(tiny_backbones))
    )
    marker = tmp_path / "ran"
    folder = export_hf_llava(
        genuine.model, genuine.tokenizer, tmp_path / "hf", template="vicuna_v1", image_aspect="pad"
    )
    config = json.loads((folder / "config.json").read_text())
    config["vision_feature_layer"] = payload(marker)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises((ConfigRefused, ValueError)):
        read_checkpoint(folder, workdir=tmp_path / "work")
    assert not marker.exists()


def test_a_hub_id_is_read_as_data_too(tiny_backbones, tmp_path, monkeypatch):
    """A hub id resolves, through the local Hugging Face cache, to a folder checked like any other."""
    marker = tmp_path / "ran"
    cache = tmp_path / "hub"
    revision = "0" * 40
    repo = cache / "models--stranger--llava"
    _official_folder(tiny_backbones, repo / "snapshots" / revision, mm_projector_type=payload(marker))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    with pytest.raises(ConfigRefused, match="mm_projector_type._target_"):
        read_checkpoint("stranger/llava", workdir=tmp_path / "work")
    assert not marker.exists()


def test_the_evaluation_front_end_refuses_it(tiny_backbones, weights, tmp_path):
    from llava_lit.eval.run import evaluate
    from llava_lit.qa_files import Question

    class OneQuestion:
        """The smallest benchmark: one text question (the checkpoint is loaded before anything is asked)."""

        image_folder = str(tmp_path)

        def questions(self):
            return [Question(question_id="1", image=None, text="Hello?", category="")]

        def score(self, answers):
            return {"answered": float(len(answers))}

    marker = tmp_path / "ran"
    ckpt = evil_checkpoint(
        tmp_path / "evil.ckpt", weights, evil_run_config(tiny_backbones, marker, "projector")
    )
    with pytest.raises(ConfigRefused):
        evaluate(OneQuestion(), "one", tmp_path / "eval", checkpoint=str(ckpt))
    assert not marker.exists()


def _cli(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_every_command_refuses_a_checkpoint_that_names_a_target(
    tiny_backbones, weights, train_overrides, tmp_path
):
    marker = tmp_path / "ran"
    ckpt = evil_checkpoint(
        tmp_path / "evil.ckpt", weights, evil_run_config(tiny_backbones, marker, "projector")
    )
    official = _official_folder(tiny_backbones, tmp_path / "official", mm_projector_type=payload(marker))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "text": "Hello?"}) + "\n")
    out = tmp_path / "outputs"
    commands = {
        "predict": _cli(
            "llava_lit.predict",
            f"checkpoint={ckpt}",
            f"questions_file={questions}",
            f"image_folder={tmp_path}",
            f"answers_file={tmp_path / 'a.jsonl'}",
            f"hydra.run.dir={out / 'predict'}",
            cwd=tmp_path,
        ),
        "chat": _cli("llava_lit.chat", f"checkpoint={ckpt}", "device=cpu", cwd=tmp_path),
        "serve": _cli(
            "llava_lit.serve", f"checkpoint={ckpt}", "port=0", f"hydra.run.dir={out / 'serve'}", cwd=tmp_path
        ),
        "export": _cli(
            "llava_lit.export", f"checkpoint={ckpt}", f"out={tmp_path / 'exported'}", cwd=tmp_path
        ),
        "train init_from=<ckpt>": _cli(
            "llava_lit.train",
            *train_overrides(out, "finetune"),
            f"init_from={ckpt}",
            "init_projector=null",
            cwd=tmp_path,
        ),
        "train init_from=<official folder>": _cli(
            "llava_lit.train",
            *train_overrides(out, "finetune"),
            f"init_from={official}",
            "init_projector=null",
            "run_name=official",
            cwd=tmp_path,
        ),
    }
    for name, process in commands.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode != 0, f"{name} accepted the checkpoint:\n{output[-3000:]}"
        assert "_target_" in output and "never instantiated" in output, f"{name}:\n{output[-3000:]}"
    assert not marker.exists()
    assert not (tmp_path / "exported").exists()
