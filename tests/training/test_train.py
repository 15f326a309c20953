"""End-to-end stage runs on tiny backbones through the real config: what trains, the stage handoff, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from llava_lit.train import build_components, build_trainer, resolve_cpu_precision, train


def _snapshot(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        part: {k: v.detach().clone() for k, v in getattr(model, part).state_dict().items()}
        for part in ("vision_tower", "projector", "language_model")
    }


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


class _RecordIds(L.Callback):
    """Records the sample ids of every training batch, in order."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ids += batch["ids"]


def _fit(cfg, *callbacks: L.Callback):
    module, datamodule = build_components(cfg)
    before = _snapshot(module.model)
    trainer = build_trainer(cfg)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return trainer, module, before, _snapshot(module.model)


def test_align_trains_only_the_projector_and_writes_handoff(compose_train):
    cfg = compose_train(
        "trainer.max_steps=2", "trainer.limit_val_batches=1", "module.peak_tflops=0.5", stage="align"
    )
    trainer, module, before, after = _fit(cfg)
    assert trainer.global_step == 2
    assert _changed(before["projector"], after["projector"])
    assert not _changed(before["vision_tower"], after["vision_tower"])
    assert not _changed(before["language_model"], after["language_model"])
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file()
    saved = load_file(str(ckpt_dir / "projector.safetensors"))
    assert saved.keys() == after["projector"].keys()
    for k, v in saved.items():
        torch.testing.assert_close(v, after["projector"][k], rtol=0, atol=0)
    # Every step is logged with the loss, learning rates, grad norm and throughput (model FLOP/s and, with a
    # peak given, MFU).
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    expected = {
        "train/loss",
        "train/grad_norm",
        "perf/samples_per_s",
        "perf/tokens_per_s",
        "perf/tflops_per_s",
        "perf/mfu",
        "perf/peak_host_memory_gib",
    }
    assert expected <= columns
    logged = [row for row in rows if row["perf/mfu"]]
    assert logged
    for row in logged:
        tflops, mfu = float(row["perf/tflops_per_s"]), float(row["perf/mfu"])
        assert tflops > 0
        assert mfu == pytest.approx(tflops / 0.5)
    assert any(c.startswith("lr/projector") for c in columns)
    checkpoint = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["llava_lit_config"]["stage"]["name"] == "align"


def test_finetune_starts_from_align_projector_and_trains_projector_and_llm(compose_train, tmp_path):
    align = compose_train("trainer.max_steps=2", "trainer.limit_val_batches=0", stage="align")
    train(align)
    projector_file = Path(align.paths.output_dir) / "checkpoints" / "projector.safetensors"
    # finetune's default init_projector is the align output of the same run_name.
    cfg = compose_train("trainer.max_steps=2", "trainer.limit_val_batches=1", stage="finetune")
    assert Path(cfg.init_projector) == projector_file
    module, _ = build_components(cfg)
    for k, v in load_file(str(projector_file)).items():
        torch.testing.assert_close(module.model.projector.state_dict()[k], v, rtol=0, atol=0)
    trainer, module, before, after = _fit(cfg)
    assert _changed(before["projector"], after["projector"])
    assert _changed(before["language_model"], after["language_model"])
    assert not _changed(before["vision_tower"], after["vision_tower"])


def test_finetune_accepts_official_mm_projector_bin(compose_train, tmp_path):
    cfg = compose_train("init_projector=null", stage="finetune")
    module, _ = build_components(cfg)
    official = {
        f"model.mm_projector.{k}": torch.randn_like(v) for k, v in module.model.projector.state_dict().items()
    }
    assert set(official) == {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    path = tmp_path / "mm_projector.bin"
    torch.save(official, path)
    cfg = compose_train(f"init_projector={path}", stage="finetune")
    module, _ = build_components(cfg)
    for k, v in module.model.projector.state_dict().items():
        torch.testing.assert_close(v, official[f"model.mm_projector.{k}"], rtol=0, atol=0)


def test_missing_init_projector_is_a_clear_error(compose_train, tmp_path):
    cfg = compose_train(f"init_projector={tmp_path / 'nope.safetensors'}", stage="finetune")
    with pytest.raises(SystemExit, match="does not exist"):
        build_components(cfg)


def test_vision_tower_trains_only_when_configured(compose_train):
    cfg = compose_train(
        "trainer.max_steps=1", "init_projector=null", "stage.train_vision_tower=true", stage="finetune"
    )
    _, _, before, after = _fit(cfg)
    assert _changed(before["vision_tower"], after["vision_tower"])


@pytest.mark.parametrize(
    ("workers", "by_length", "packing"),
    [(0, False, False), (2, False, False), (0, True, False), (0, False, True)],
)
def test_mid_epoch_resume_continues_with_the_unseen_samples(compose_train, workers, by_length, packing):
    # 32 samples / micro-batch 4 = 8 batches per epoch, 2 per optimizer step: step 2 is mid-epoch.
    common = [
        "trainer.limit_val_batches=0",
        f"data.num_workers={workers}",
        f"data.cache_samples={workers == 0}",  # the world's sample cache needs in-process loading
        f"data.group_by_length={by_length}",
        f"data.packing={packing}",
    ]
    whole = _RecordIds()
    _fit(compose_train(*common, "trainer.max_steps=4", "run_name=whole", stage="align"), whole)

    first, second = _RecordIds(), _RecordIds()
    cfg = compose_train(
        *common, "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2", stage="align"
    )
    _fit(cfg, first)
    mid = Path(cfg.paths.output_dir) / "checkpoints" / "step000002.ckpt"
    trainer, *_ = _fit(
        compose_train(*common, "trainer.max_steps=4", f"ckpt_path={mid}", stage="align"), second
    )
    assert trainer.global_step == 4
    assert trainer.fit_loop.epoch_progress.total.started == 1  # still epoch 0, not a restarted epoch
    # The interrupted run saw exactly the uninterrupted run's samples, in the same order, none twice.
    assert first.ids + second.ids == whole.ids
    assert len(set(whole.ids)) == 32


def test_init_from_a_whole_checkpoint_starts_from_its_weights(compose_train):
    align = compose_train("trainer.max_steps=1", "trainer.limit_val_batches=0", stage="align")
    _, trained, _, after = _fit(align)
    ckpt = Path(align.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = compose_train(f"init_from={ckpt}", "init_projector=null", "run_name=from_ckpt", stage="finetune")
    module, _ = build_components(cfg)
    started = _snapshot(module.model)
    for part in after:
        for k, v in after[part].items():
            torch.testing.assert_close(started[part][k], v, rtol=0, atol=0)
    assert cfg.model.projector == trained.run_config["model"]["projector"]


class _RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow  # two compiles (forward and backward) of the tiny LLaMA's decoder layer: ~20 s
def test_compiled_decoder_layers_train_as_the_eager_ones(compose_train):
    runs = {}
    for compiled in (False, True):
        cfg = compose_train(
            f"module.compile_blocks={compiled}",
            f"run_name=compiled_{compiled}",
            "init_projector=null",
            "trainer.precision=32-true",  # fp32, so both runs agree to rounding
            "trainer.max_steps=3",
            "trainer.limit_val_batches=1",  # the compiled layers also run under no_grad
            stage="finetune",
        )
        losses = _RecordLosses()
        L.seed_everything(0)  # the same fresh projector and batch order in both runs
        _, module, _, after = _fit(cfg, losses)
        runs[compiled] = (losses.losses, after, module)
    (eager_losses, eager_after, _), (losses, after, module) = runs[False], runs[True]
    assert all(layer._compiled_call_impl is not None for layer in module.model.decoder_layers)
    # Compiled in place: the same parameter names, so checkpoints load into an uncompiled model.
    assert {k: v.keys() for k, v in after.items()} == {k: v.keys() for k, v in eager_after.items()}
    assert len(losses) == len(eager_losses) == 6  # 3 steps of 2 micro-batches
    torch.testing.assert_close(losses, eager_losses, rtol=1e-4, atol=1e-5)
    for k, v in after["language_model"].items():
        torch.testing.assert_close(v, eager_after["language_model"][k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cpu_precision_follows_native_bf16_and_emulated_bf16_is_warned(has_bf16, monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_bf16)
    cases = (
        ("bf16-mixed", "bf16-mixed", not has_bf16),
        ("32-true", "32-true", False),
        (None, "bf16-mixed" if has_bf16 else "32-true", False),
    )
    for requested, resolved, warned in cases:
        caplog.clear()
        cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "precision": requested}})
        resolve_cpu_precision(cfg)
        assert cfg.trainer.precision == resolved
        assert ("emulated" in caplog.text) == warned, (requested, caplog.text)
    caplog.clear()
    gpu = OmegaConf.create({"trainer": {"accelerator": "gpu", "precision": "bf16-mixed"}})
    resolve_cpu_precision(gpu)
    assert gpu.trainer.precision == "bf16-mixed" and not caplog.text


def test_packing_with_an_attention_that_mixes_samples_is_refused(compose_train):
    cfg = compose_train("data.packing=true", "model.language_model.attn_implementation=flex_attention")
    with pytest.raises(ValueError, match="data.packing=true needs an attention implementation"):
        build_components(cfg)
