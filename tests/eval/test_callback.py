"""The sample-answer callback in a real (tiny, CPU) training run with W&B offline: table files and metrics.

Answers come from greedy decoding of the random-init tiny LLaMA on the text prompt: real generation, so the
logged answers are whatever the model says, and the test checks the plumbing (table written, rows, images,
metrics logged), not answer quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from llava_lit.eval.callback import SampleAnswersCallback
from llava_lit.eval.scienceqa import ScienceQABenchmark
from llava_lit.qa_files import Question


class TinyLM(pl.LightningModule):
    """A tiny causal LM trained on a few token rows; answers questions text-only with greedy decoding."""

    def __init__(self, llm_dir: Path, tokenizer) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        self.lm = LlamaForCausalLM.from_pretrained(llm_dir)
        self.tokenizer = tokenizer

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.lm(input_ids=ids, labels=ids).loss

    def validation_step(self, batch, batch_idx):
        (ids,) = batch
        self.log("val/loss", self.lm(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def greedy_text_answers(module: TinyLM, questions: list[Question], image_folder: str) -> list[str]:
    answers = []
    for q in questions:
        ids = module.tokenizer(q.text, return_tensors="pt").input_ids
        out = module.lm.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        answers.append(module.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


@pytest.mark.slow
def test_wandb_table_and_metrics_in_offline_run(
    tiny_backbones: Path,
    llama_tokenizer,
    scienceqa_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    bench = ScienceQABenchmark(
        problems=str(scienceqa_dir / "problems.json"),
        pid_splits=str(scienceqa_dir / "pid_splits.json"),
        image_folder=str(scienceqa_dir / "images" / "test"),
        limit=4,
    )
    callback = SampleAnswersCallback(bench, num_questions=4, key="sqa", generate=greedy_text_answers)
    data = DataLoader(TensorDataset(torch.randint(3, 1000, (2, 8))), batch_size=2)
    logger = WandbLogger(project="llava_lit_test", save_dir=str(tmp_path), offline=True)
    trainer = pl.Trainer(
        max_steps=2, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=0, logger=logger,
        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(TinyLM(tiny_backbones / "llm", llama_tokenizer), data, data)
    logger.experiment.finish()

    assert trainer.callback_metrics["sqa/overall/n"] == 4.0
    assert 0.0 <= float(trainer.callback_metrics["sqa/overall/acc"]) <= 100.0
    tables = sorted(tmp_path.glob("wandb/offline-run-*/files/media/table/sqa/answers_*.table.json"))
    assert tables, list(tmp_path.rglob("*.json"))
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["question_id", "image", "prompt", "answer", "reference"]
    rows = {row[0]: row for row in table["data"]}
    assert set(rows) == {"1", "2", "3", "4"}
    assert rows["1"][4] == "A. choice 1a" and rows["4"][4] == "B. choice 4b"
    assert rows["1"][1] is not None and rows["3"][1] is None  # problem 3 has no image
    pngs = list(tmp_path.glob("wandb/offline-run-*/files/media/images/sqa/images_*.png"))
    assert len(pngs) == 2 * len(tables)  # problems 1 and 4 have images, at every validation
