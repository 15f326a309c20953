"""`python -m llava_lit.predict`: answer an official LLaVA question file with a trained checkpoint, in batches.

    python -m llava_lit.predict checkpoint=outputs/world/finetune/checkpoints/last.ckpt \
        questions_file=questions.jsonl image_folder=images answers_file=answers.jsonl batch_size=16
    python -m llava_lit.predict ... devices=8 accelerator=gpu     # one process per GPU, Lightning's predict loop
    python -m llava_lit.predict checkpoint=exported/world ...     # a transformers LLaVA folder (our export)
    python -m llava_lit.predict checkpoint=llava-v1.5-7b template=vicuna_v1 ...   # an official LLaVA folder

Reads the question JSONL (`question_id`, `image`, `text`, optional `category`) and appends to the official answer
JSONL (`question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`) batch by batch, so an interrupted run
resumes where it stopped: questions already in the answer file are skipped. With several processes each writes
its own part file, merged into the answer file at the end. A missing or undecodable image does not stop the run:
that question's line has empty `text` and the reason in `metadata.error`.

`predict(...)` is the Python entry the evaluation front end calls; `generate_answers(module, questions, folder)`
answers in memory with a model under training (sample tables during validation).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.hydra_app import hydra_app
from llava_lit.images import ImageDecodeError, ImageLoader
from llava_lit.inference import Generator, InferenceBundle, SamplingParams, load_for_inference
from llava_lit.inference.loading import bundle_from_model
from llava_lit.load_settings import LoadSettings
from llava_lit.qa_files import Question, read_questions
from llava_lit.tokenization import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PredictConfig(LoadSettings):
    """Settings of a prediction run (the keys of `conf/predict.yaml`; the load settings from `LoadSettings`)."""

    checkpoint: str
    """A Lightning `.ckpt` file, an FSDP2 checkpoint directory, a transformers LLaVA folder (what
    `python -m llava_lit.export` writes, `llava-hf/*`), an official LLaVA folder, or a hub id of the last two."""
    questions_file: str
    """Official question JSONL."""
    image_folder: str
    """Folder the questions' `image` paths are relative to."""
    answers_file: str
    """Official answer JSONL to append to (created if missing; answered questions are skipped)."""
    batch_size: int = 16
    """Questions per generation batch (per process)."""
    max_new_tokens: int = 128
    """Answer length limit in tokens (the official VQA scripts use 128)."""
    temperature: float = 0.0
    """0 is greedy (as every official benchmark); above 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold (used when `temperature > 0`)."""
    seed: int = 0
    """Sampling seed."""
    model_id: str | None = None
    """`model_id` written to every answer; default `run_name/stage` from the checkpoint's config."""
    accelerator: str = "auto"
    """Lightning accelerator (`cpu`, `gpu`, `auto`)."""
    devices: int = 1
    """Processes/devices for the predict loop; above 1 shards the questions across them."""
    num_workers: int = 0
    """DataLoader workers decoding images."""


def question_turns(question: Question) -> list[dict[str, str]]:
    """The one-turn conversation for a question: `<image>\\n` + text for image questions, as in LLaVA's eval."""
    text = question.text.replace(IMAGE_TOKEN, "").strip()
    if question.image:
        text = f"{IMAGE_TOKEN}\n{text}"
    return [{"from": "human", "value": text}]


class QuestionDataset(Dataset):
    """Questions with their preprocessed image, or the reason the image could not be used."""

    def __init__(
        self, questions: Sequence[Question], image_folder: str | Path, image_loader: ImageLoader
    ) -> None:
        self.questions = list(questions)
        self.image_folder = Path(image_folder)
        self.image_loader = image_loader

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        question = self.questions[index]
        item: dict[str, Any] = {"question": question, "pixel_values": None, "error": None}
        if question.image:
            path = self.image_folder / question.image
            try:
                item["pixel_values"] = self.image_loader(path.read_bytes())  # [3, H, W]
            except FileNotFoundError:
                item["error"] = f"image_missing: {path}"
            except (ImageDecodeError, OSError) as err:
                item["error"] = f"{getattr(err, 'reason', 'image_unreadable')}: {path}: {err}"
        return item


def _keep_list(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def answer_batch(
    bundle: InferenceBundle, generator: Generator, items: Sequence[dict[str, Any]], params: SamplingParams
) -> list[dict[str, Any]]:
    """Official answer records for a batch of dataset items; items with an image error are reported, not asked."""
    ok = [item for item in items if item["error"] is None]
    prompts = []
    for item in ok:
        images = [item["pixel_values"]] if item["pixel_values"] is not None else []
        prompts.append(bundle.prompt(question_turns(item["question"]), images))
    completions = iter(generator.generate(prompts, params) if prompts else [])
    records = []
    for item in items:
        question: Question = item["question"]
        metadata: dict[str, Any] = {}
        if item["error"] is None:
            completion = next(completions)
            text = completion.text
            metadata = {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            }
        else:
            text = ""
            metadata = {"error": item["error"]}
            log.warning("question %s: %s", question.question_id, item["error"])
        records.append(
            {
                "question_id": question.written_id,  # as the question file wrote it (int or string)
                "prompt": question.text,
                "text": text,
                "answer_id": uuid.uuid4().hex,
                "model_id": bundle.model_id,
                "metadata": metadata,
            }
        )
    return records


class PredictionModule(L.LightningModule):
    """Lightning's predict loop around a loaded model: one batch of dataset items -> answer records."""

    def __init__(self, bundle: InferenceBundle, params: SamplingParams) -> None:
        super().__init__()
        self.model = bundle.model  # registered, so Lightning moves it to each process's device
        self.bundle = bundle
        self.params = params

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Items hold `Question` dataclasses; the generator moves the stacked tensors to the model's device itself.
        return batch

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        return answer_batch(self.bundle, self.bundle.generator(), batch, self.params)


class AnswerWriter(BasePredictionWriter):
    """Appends each batch's records to this process's answer file as soon as the batch is done."""

    def __init__(self, answers_file: Path) -> None:
        super().__init__(write_interval="batch")
        self.answers_file = answers_file

    def path_for(self, trainer: L.Trainer) -> Path:
        """The main answer file for a single process; a part file per rank otherwise."""
        if trainer.world_size == 1:
            return self.answers_file
        return part_file(self.answers_file, trainer.global_rank)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        path = self.path_for(trainer)
        if batch_idx == 0:
            end_last_line(path)
        with path.open("a", encoding="utf-8") as f:
            for record in prediction:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def part_file(answers_file: Path, rank: int) -> Path:
    """Where process `rank` writes its answers during a multi-process run."""
    return answers_file.with_name(f"{answers_file.name}.part{rank}")


def answered_ids(answers_file: Path) -> set[str]:
    """Question ids already present in the answer file or in leftover part files of an interrupted run."""
    ids: set[str] = set()
    for path in [answers_file, *sorted(answers_file.parent.glob(answers_file.name + ".part*"))]:
        if not path.exists():
            continue
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    ids.add(str(json.loads(line)["question_id"]))
                except (json.JSONDecodeError, KeyError):
                    # A line cut by a crash mid-write: its question is asked again.
                    log.warning("%s: ignoring an unreadable line %r", path, line[:80])
    return ids


def end_last_line(path: Path) -> None:
    """Terminate a line cut by a crash, so appended answers start on a line of their own."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


def merge_parts(answers_file: Path) -> None:
    """Append every part file to the answer file and remove it (run by one process after all finished)."""
    for part in sorted(answers_file.parent.glob(answers_file.name + ".part*")):
        end_last_line(answers_file)
        end_last_line(part)
        with answers_file.open("a", encoding="utf-8") as out:
            out.write(part.read_text(encoding="utf-8"))
        part.unlink()


def predict(
    questions_file: str | Path,
    image_folder: str | Path,
    answers_file: str | Path,
    *,
    checkpoint: str | Path,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    **settings: Any,
) -> Path:
    """Answer the question file into the answer file (appending, skipping answered questions); returns its path.

    `settings` are the other `PredictConfig` fields (`temperature`, `devices`, `accelerator`, `dtype`, ...).
    """
    cfg = PredictConfig(
        checkpoint=str(checkpoint),
        questions_file=str(questions_file),
        image_folder=str(image_folder),
        answers_file=str(answers_file),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        **settings,
    )
    return run(cfg)


def run(cfg: PredictConfig) -> Path:
    """Run prediction as configured; returns the answer file's path."""
    answers_file = Path(cfg.answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    questions = read_questions(cfg.questions_file)
    done = answered_ids(answers_file)
    end_last_line(answers_file)
    todo = [q for q in questions if q.question_id not in done]
    log.info(
        "%d questions, %d already answered, %d to answer",
        len(questions),
        len(questions) - len(todo),
        len(todo),
    )
    if not todo:
        merge_parts(answers_file)
        return answers_file
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.devices != 1:
        raise ValueError("quantized prediction runs on one device; set devices=1")
    quantized = cfg.load_in_4bit or cfg.load_in_8bit
    accelerator = cfg.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    bundle = load_for_inference(
        cfg.checkpoint,
        cfg.load_settings(),
        device="cuda" if quantized and accelerator == "gpu" else "cpu",  # quantized: single device only
        model_id=cfg.model_id,
    )
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed
    )
    loader = DataLoader(
        QuestionDataset(todo, cfg.image_folder, bundle.image_loader),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=_keep_list,
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=cfg.devices,
        strategy="ddp" if cfg.devices > 1 else "auto",
        logger=False,
        callbacks=[AnswerWriter(answers_file)],
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.predict(PredictionModule(bundle, params), dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        merge_parts(answers_file)
    return answers_file


def generate_answers(
    module: L.LightningModule,
    questions: Sequence[Question],
    image_folder: str | Path,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy answers, in order, from the model inside a `LlavaLitModule` (its `run_config` names the rest).

    Runs on the module's device in eval mode and restores its training mode; an image error answers "".
    """
    run_config = module.run_config
    model_cfg = run_config["model"]
    tokenizer = load_tokenizer(
        str(model_cfg.get("tokenizer_name_or_path") or model_cfg["language_model"]["name_or_path"]),
        legacy=model_cfg.get("tokenizer_legacy"),
    )
    bundle = bundle_from_model(module.model, tokenizer, run_config)
    generator = bundle.generator()
    dataset = QuestionDataset(questions, image_folder, bundle.image_loader)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    was_training = module.model.training
    module.model.eval()
    try:
        answers = []
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            answers += [r["text"] for r in answer_batch(bundle, generator, items, params)]
    finally:
        module.model.train(was_training)
    return answers


@hydra_app("predict", schemas={"": PredictConfig})
def main(cfg: DictConfig) -> None:
    settings = PredictConfig(**OmegaConf.to_container(cfg, resolve=True))
    path = run(settings)
    log.info("answers in %s (%s)", path, json.dumps(asdict(settings)))


if __name__ == "__main__":
    main()
