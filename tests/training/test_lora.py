"""LoRA and QLoRA finetuning on the tiny backbones through the real config: what trains, what a checkpoint holds,
exact resume, loading for inference, and the refused combinations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_lit.export import ExportConfig, run_export
from llava_lit.inference.loading import load_for_inference
from llava_lit.lora import ADAPTER_MARKER
from llava_lit.train import build_components, build_trainer

LORA = ("module.lora.enabled=true", "module.lora.r=4", "module.lora.alpha=8", "init_projector=null")


def _fit(cfg):
    module, datamodule = build_components(cfg)
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return trainer, module


def _batch(module, tokenizer_len: int = 32000) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tokens = module.model.num_image_tokens
    ids = torch.randint(3, 1000, (2, 24))
    ids[:, 2 : 2 + tokens] = module.model.image_token_id
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(2, 3, 56, 56),
    }


@pytest.mark.slow
def test_lora_trains_adapters_and_projector_only_and_checkpoints_them(compose_train, tmp_path):
    cfg = compose_train(*LORA, "trainer.max_steps=2", "trainer.limit_val_batches=1", stage="finetune")
    module, datamodule = build_components(cfg)
    base = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    trainer = build_trainer(cfg)
    trainer.fit(module, datamodule=datamodule)
    after = module.model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    assert changed, "nothing trained"
    assert all(ADAPTER_MARKER in k or k.startswith("projector.") for k in changed), sorted(changed)[:5]
    assert any(".lora_B." in k for k in changed) and any(k.startswith("projector.") for k in changed)
    # The checkpoint holds exactly the trained parameters (adapters + projector), and the optimizer.
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    trained = {"model." + n for n, p in module.model.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trained
    assert not any("vision_tower" in k or "embed_tokens" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"]
    # Inference rebuilds base + adapters and merges them: same logits as the trained (unmerged) model.
    module.model.eval()
    batch = _batch(module)
    with torch.no_grad():
        expected = module.model(**batch).logits
    bundle = load_for_inference(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert not hasattr(bundle.model.language_model, "peft_config")  # merged: a plain transformers LLM
    with torch.no_grad():
        got = bundle.model(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    _check_exports(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", module, batch, tmp_path)


def _check_exports(checkpoint: Path, module, batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """The merged export is a transformers LLaVA with the trained model's logits; the peft export is the adapter
    that, over the base LLM, gives the trained LLM's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    run_export(ExportConfig(checkpoint=str(checkpoint), out=str(tmp_path / "merged")))
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        theirs = hf(**batch).logits
        ours = module.model(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    out = run_export(
        ExportConfig(checkpoint=str(checkpoint), out=str(tmp_path / "adapter"), lora_format="peft")
    )
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "projector.safetensors",
    }
    config = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    base.resize_token_embeddings(module.model.language_model.get_input_embeddings().weight.shape[0])
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    ids = batch["input_ids"].clamp(max=999)  # text only: the LLM alone
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
        ours = module.model.language_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lora_resume_is_exact(compose_train, tmp_path):
    # 8 micro-batches of 4, 2 per optimizer step: step 2 is mid-epoch. Adapter dropout is on (0.05).
    common = (*LORA, "trainer.max_steps=4", "trainer.limit_val_batches=0")
    straight_cfg = compose_train(
        *common,
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
        stage="finetune",
    )
    _, straight = _fit(straight_cfg)
    mid = Path(straight_cfg.paths.output_dir) / "checkpoints" / "step000002.ckpt"
    resumed_cfg = compose_train(
        *common, f"paths.output_root={tmp_path / 'resumed'}", f"ckpt_path={mid}", stage="finetune"
    )
    trainer, resumed = _fit(resumed_cfg)
    assert trainer.global_step == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_qlora_trains_over_a_4bit_base_and_loads_merged(compose_train):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = compose_train(
        *LORA,
        "module.lora.quantize=nf4",
        "module.lora.compute_dtype=float32",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "optimizer.name=adamw_8bit",
        stage="finetune",
    )
    trainer, module = _fit(cfg)
    linear4 = [m for m in module.model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linear4, "the base LLM is not 4-bit"
    assert all(not m.weight.requires_grad for m in linear4)
    assert trainer.global_step == 2
    module.model.eval()
    batch = _batch(module)
    with torch.no_grad():
        expected = module.model(**batch).logits
    # Merged into the NF4-rounded base: the full-precision model computes what the 4-bit one trained.
    bundle = load_for_inference(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        got = bundle.model(**batch).logits
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


def test_qlora_evaluation_leaves_the_4bit_weights_in_their_training_layout(compose_train):
    """An eval-mode forward without gradients (validation between QLoRA steps) leaves every 4-bit weight as it was
    quantized: bitsandbytes would otherwise repack it in place for its CPU inference kernel on CPUs with
    AVX512-BF16, which compiled decoder layers cannot trace and later training steps would run on."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = compose_train(*LORA, "module.lora.quantize=nf4", stage="finetune")
    module, _ = build_components(cfg)
    module.configure_model()
    linear4 = [m for m in module.model.language_model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [m.weight.data.clone() for m in linear4]
    module.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        module.model(**_batch(module))
    assert linear4 and not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linear4
    )
    assert all(torch.equal(m.weight.data, w) for m, w in zip(linear4, before, strict=True))


@pytest.mark.parametrize(
    ("overrides", "stage", "message"),
    [
        ((), "align", "only the finetune stage"),
        (("trainer=fsdp_cpu",), "finetune", "FSDP2"),
        (("init_from=some/where", "module.lora.quantize=nf4"), "finetune", "init_from"),
    ],
)
def test_refused_lora_combinations(compose_train, overrides, stage, message):
    cfg = compose_train("module.lora.enabled=true", *overrides, stage=stage)
    with pytest.raises(ValueError, match=message):
        build_components(cfg)


def test_quantize_without_lora_is_refused(compose_train):
    cfg = compose_train("module.lora.quantize=nf4", stage="finetune")
    with pytest.raises(ValueError, match="needs module.lora.enabled"):
        build_components(cfg)
