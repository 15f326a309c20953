"""When checkpoints are written: every N minutes of training in every config, and only between optimizer steps."""

from __future__ import annotations

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from llava_lit.hydra_app import config_dir
from llava_lit.train import build_components, build_trainer

CONF = config_dir()
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("overrides", [[], ["stage=finetune"], *[[f"experiment={e}"] for e in EXPERIMENTS]])
def test_every_recipe_saves_during_an_epoch(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    checkpoint = cfg.callbacks.model_checkpoint
    assert checkpoint._target_ == "llava_lit.checkpointing.StepCheckpoint"
    assert checkpoint.every_n_minutes or checkpoint.every_n_train_steps
    assert checkpoint.save_last
    assert cfg.callbacks.preemption._target_ == "llava_lit.preemption.PreemptionCheckpoint"


class _Saves(L.Callback):
    """Records how many batches of the epoch were done at each checkpoint save."""

    def __init__(self) -> None:
        self.done: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.done.append(trainer.fit_loop.epoch_loop.batch_progress.current.processed)


def test_time_based_saves_land_between_optimizer_steps(compose_train):
    # 32 samples / micro-batch 4 = 8 batches an epoch, 2 per optimizer step; a save is due after every batch.
    cfg = compose_train(
        "callbacks.model_checkpoint.every_n_minutes=1e-9",
        "trainer.max_steps=4",
        "trainer.limit_val_batches=0",
    )
    module, datamodule = build_components(cfg)
    trainer = build_trainer(cfg)
    saves = _Saves()
    trainer.callbacks.append(saves)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.accumulate_grad_batches == 2
    # Mid-epoch saves, each after a whole optimizer step: never with half an accumulation unsaved.
    assert saves.done and all(done % 2 == 0 for done in saves.done)
    assert any(done < 8 for done in saves.done)
