"""W&B: an offline run logs locally with no account; a run that would need an account fails at once, clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_lit.train import check_wandb, train


def test_missing_api_key_is_a_clear_error_not_a_hang(compose_train, monkeypatch, tmp_path):
    cfg = compose_train("logger=wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B entry
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(SystemExit, match="wandb login"):
        check_wandb(cfg)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    check_wandb(cfg)  # a key is enough to proceed


def test_offline_wandb_run_writes_its_files(compose_train, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train("logger=wandb", "trainer.max_steps=2", "trainer.limit_val_batches=0")
    train(cfg)
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run has no event log"
