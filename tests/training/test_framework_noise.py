"""A Lightning fit prints its framework notices only with `verbose`; llava_lit's own messages are untouched."""

from __future__ import annotations

import logging
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from llava_lit.framework_noise import _LIGHTNING_LOGGERS, _DropPrefixes, silence_framework_noise


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(torch.randn(4, 2))

    def __len__(self) -> int:
        return 4


class _Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
        self.head = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.head(self.frozen(batch)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def _fit(tmp_path) -> None:
    model = _Model()
    model.frozen.eval()  # as the stage freezer leaves a frozen tower
    trainer = L.Trainer(
        max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DataLoader(_Stream(), batch_size=2))


@pytest.mark.parametrize("verbose", [False, True])
def test_framework_notices_show_only_when_verbose(verbose, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            silence_framework_noise(verbose)
            _fit(tmp_path)
    finally:
        for name in _LIGHTNING_LOGGERS:
            for f in [f for f in logging.getLogger(name).filters if isinstance(f, _DropPrefixes)]:
                logging.getLogger(name).removeFilter(f)
    messages = " | ".join(str(w.message) for w in caught)
    noisy = ("IterableDataset` has `__len__`" in messages, "in eval mode" in messages, "Tip:" in caplog.text)
    assert noisy == (verbose, verbose, verbose), (messages, caplog.text)
    assert "GPU available" in caplog.text  # what the run uses is still said
