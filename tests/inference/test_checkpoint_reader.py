"""The one checkpoint reader: each kind of path is recognised, and the loader holds the weights once.

Every kind is built for real in a temporary folder from the tiny fixtures (a training checkpoint file, its FSDP2
directory, our export, the same folder without our model card as llava-hf ships it, an official folder and its
stage-1 projector), then classified and read. The single-copy property is checked twice: the built model's
parameters are the very tensors the reader returned (shared storage, no copy), and a ~50M-parameter checkpoint
loaded in a fresh process raises the peak resident memory by less than 1.5x the weights' size (a loader that
builds a random-init model and copies the checkpoint into it needs 2x or more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from inference_helpers import write_official
from llava_lit.checkpoint_reader import (
    CheckpointKind,
    NotACheckpoint,
    classify_checkpoint,
    read_checkpoint,
)
from llava_lit.interop.export_hf import export_hf_llava

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kinds(
    tiny_checkpoint: Path, tiny_bundle, tiny_backbones: Path, llama_tokenizer_dir: Path, tmp_path_factory
) -> dict[CheckpointKind, Path]:
    """One path of every local kind."""
    root = tmp_path_factory.mktemp("kinds")
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    distributed = root / "distributed.ckpt"
    dcp.save(
        {"state_dict": ckpt.pop("state_dict"), "optimizer_0": {"m": torch.ones(3)}},
        checkpoint_id=str(distributed),
    )
    torch.save(ckpt, distributed / "meta.pt")
    exported = export_hf_llava(
        tiny_bundle.model, tiny_bundle.tokenizer, root / "exported", template="vicuna_v1", image_aspect="pad"
    )
    hf = export_hf_llava(
        tiny_bundle.model, tiny_bundle.tokenizer, root / "hf", template="vicuna_v1", image_aspect="pad"
    )
    (hf / "README.md").unlink()  # llava-hf folders carry their own card, without our tag
    official = write_official(
        tiny_bundle.model, root / "official", tiny_backbones, llama_tokenizer_dir, with_tower=True
    )
    stage1 = root / "stage1"
    stage1.mkdir()
    config = json.loads((official / "config.json").read_text())
    (stage1 / "config.json").write_text(json.dumps({**config, "_name_or_path": str(tiny_backbones / "llm")}))
    projector = {f"model.mm_projector.{k}": v for k, v in tiny_bundle.model.projector.state_dict().items()}
    torch.save(projector, stage1 / "mm_projector.bin")
    return {
        CheckpointKind.LIGHTNING_FILE: tiny_checkpoint,
        CheckpointKind.DISTRIBUTED_DIR: distributed,
        CheckpointKind.EXPORTED_FOLDER: exported,
        CheckpointKind.HF_FOLDER: hf,
        CheckpointKind.OFFICIAL_FOLDER: official,
        CheckpointKind.OFFICIAL_PROJECTOR: stage1 / "mm_projector.bin",
    }


def test_every_local_kind_is_recognised_and_read(kinds, tiny_bundle, tmp_path):
    expected = {
        CheckpointKind.LIGHTNING_FILE: "llava_lit",
        CheckpointKind.DISTRIBUTED_DIR: "llava_lit",
        CheckpointKind.EXPORTED_FOLDER: "hf",
        CheckpointKind.HF_FOLDER: "hf",
        CheckpointKind.OFFICIAL_FOLDER: "official",
        CheckpointKind.OFFICIAL_PROJECTOR: "official_projector",
    }
    for kind, path in kinds.items():
        assert classify_checkpoint(path) is kind, path
        read = read_checkpoint(path, workdir=tmp_path / kind.name)
        assert read.kind == expected[kind], kind
    assert (
        classify_checkpoint(kinds[CheckpointKind.OFFICIAL_PROJECTOR].parent)
        is CheckpointKind.OFFICIAL_PROJECTOR
    )
    # every kind that holds the whole model rebuilds the same weights
    reference = tiny_bundle.model.state_dict()
    for kind in (
        CheckpointKind.LIGHTNING_FILE,
        CheckpointKind.DISTRIBUTED_DIR,
        CheckpointKind.EXPORTED_FOLDER,
    ):
        model, _ = read_checkpoint(kinds[kind], workdir=tmp_path / "again").build()
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key]), (kind, key)


def test_a_hub_id_is_its_own_kind():
    assert classify_checkpoint("liuhaotian/llava-v1.5-7b") is CheckpointKind.HUB_ID


@pytest.mark.parametrize("case", ["empty_dir", "text_file", "other_model", "half_distributed"])
def test_what_is_no_checkpoint_is_refused_listing_the_kinds(case, tmp_path):
    path = tmp_path / case
    if case == "text_file":
        path.write_text("hello")
    else:
        path.mkdir()
    if case == "other_model":
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if case == "half_distributed":
        (path / ".metadata").write_bytes(b"")
    with pytest.raises(NotACheckpoint) as err:
        classify_checkpoint(path)
    for kind in CheckpointKind:
        assert kind.value in str(err.value)


def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        classify_checkpoint(tmp_path / "gone.ckpt")
    with pytest.raises(FileNotFoundError):
        classify_checkpoint("./owner/name")


@pytest.mark.parametrize(
    "kind", [CheckpointKind.LIGHTNING_FILE, CheckpointKind.DISTRIBUTED_DIR, CheckpointKind.EXPORTED_FOLDER]
)
def test_the_model_holds_the_read_tensors_themselves(kind, kinds, tmp_path):
    read = read_checkpoint(kinds[kind], workdir=tmp_path)
    pointers = {key: value.data_ptr() for key, value in read.state_dict.items()}
    model, _ = read.build()
    own = model.state_dict()
    for key, pointer in pointers.items():
        assert own[key].data_ptr() == pointer, f"{key} was copied"
    assert not any(p.is_meta for p in model.parameters())
    assert not any(p.requires_grad for p in model.vision_tower.parameters())  # built frozen, kept frozen


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    from llava_lit.checkpoint_reader import read_checkpoint
    from llava_lit.tokenization import load_tokenizer
    tokenizer = load_tokenizer(sys.argv[2])
    start = status("VmRSS")
    model, _ = read_checkpoint(sys.argv[1]).build(tokenizer)
    with torch.no_grad():
        total = sum(float(p.sum()) for p in model.parameters())  # every weight in memory
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": status("VmHWM") - start, "weights": weights}))
    """
)


@pytest.mark.slow
def test_loading_a_50m_parameter_checkpoint_holds_its_weights_once(tiny_backbones, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from inference_helpers import save_checkpoint, tiny_run_config

    llm = tmp_path / "llm"
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
    )
    LlamaForCausalLM(config).save_pretrained(llm)
    (llm / "tokenizer.model").write_bytes((tiny_backbones / "llm" / "tokenizer.model").read_bytes())
    run_config = tiny_run_config(tiny_backbones)
    run_config["model"]["language_model"]["name_or_path"] = str(llm)
    checkpoint = save_checkpoint(tmp_path / "last.ckpt", run_config)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(checkpoint), str(llm)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["weights"] > 190e6  # ~50M float32 parameters
    ratio = result["growth"] / result["weights"]
    assert ratio < 1.5, f"loading grew the peak memory by {ratio:.2f}x the weights"
