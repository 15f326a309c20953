"""`python -m llava_lit.chat`: talk with a trained model about an image in the terminal, answers streamed.

    python -m llava_lit.chat checkpoint=outputs/world/finetune/checkpoints/last.ckpt image=photo.jpg

Commands: `/image PATH` switches to another image (and starts a new conversation, since the image sits in the
first turn as in training), `/reset` starts over with the same image, `/quit` (or end of input) leaves. The
prompt is built by the training template from the whole conversation so far.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from omegaconf import DictConfig, OmegaConf

from llava_lit.constants import IMAGE_TOKEN
from llava_lit.hydra_app import hydra_app
from llava_lit.images import ImageDecodeError, TiledImage
from llava_lit.inference import InferenceBundle, SamplingParams, load_for_inference
from llava_lit.load_settings import LoadSettings

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ChatConfig(LoadSettings):
    """Settings of a chat session (the keys of `conf/chat.yaml`; the load settings from `LoadSettings`)."""

    checkpoint: str
    """What `checkpoint_reader.read_checkpoint` reads: a `.ckpt` file, an FSDP2 checkpoint directory, an
    exported, llava-hf or official LLaVA folder, or a hub id."""
    image: str | None = None
    """Image to talk about at the start; None starts a text-only conversation."""
    temperature: float = 0.2
    """Sampling temperature (the official CLI's default); 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 512
    """Answer length limit in tokens."""
    seed: int | None = None
    """Sampling seed; None is not reproducible."""
    device: str = "auto"
    """`cpu`, `cuda`, or `auto` (CUDA when available)."""


class ChatSession:
    """One conversation: turns so far plus the current image, answered through the bundle's generator."""

    def __init__(self, bundle: InferenceBundle, params: SamplingParams, out: TextIO) -> None:
        self.bundle = bundle
        self.generator = bundle.generator()
        self.params = params
        self.out = out
        self.turns: list[dict[str, str]] = []
        self.pixel_values: torch.Tensor | TiledImage | None = None  # [3, H, W], or tiles for an AnyRes model

    def set_image(self, path: str) -> None:
        """Switch to the image at `path` (a new conversation); raises `OSError`/`ImageDecodeError`."""
        self.pixel_values = self.bundle.image_loader(Path(path).expanduser().read_bytes())
        self.turns = []

    def ask(self, question: str) -> str:
        """Stream the answer to `question` to `out` and return it."""
        text = question.replace(IMAGE_TOKEN, "").strip()
        if not self.turns and self.pixel_values is not None:
            text = f"{IMAGE_TOKEN}\n{text}"
        turns = [*self.turns, {"from": "human", "value": text}]
        images = [self.pixel_values] if self.pixel_values is not None else []
        prompt = self.bundle.prompt(turns, images)
        self.generator.check_length(prompt, self.params.max_new_tokens)
        pieces = []
        for delta in self.generator.stream(prompt, self.params):
            self.out.write(delta.text)
            self.out.flush()
            pieces.append(delta.text)
        answer = "".join(pieces)
        self.turns = [*turns, {"from": "gpt", "value": answer}]
        return answer


def run(cfg: ChatConfig, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Load the model and run the read-answer loop until `/quit` or end of input."""
    bundle = load_for_inference(cfg.checkpoint, cfg.load_settings(), device=cfg.device)
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed
    )
    session = ChatSession(bundle, params, out)
    out.write(f"{bundle.model_id} (template {bundle.template.name}). Commands: /image PATH, /reset, /quit\n")
    if cfg.image:
        _switch_image(session, cfg.image, out)
    while True:
        out.write("USER: ")
        out.flush()
        line = stdin.readline()
        if not line:
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            session.turns = []
            out.write("(conversation reset)\n")
        elif line.startswith("/image"):
            path = line[len("/image") :].strip()
            if path:
                _switch_image(session, path, out)
            else:
                out.write("usage: /image PATH\n")
        else:
            out.write("ASSISTANT: ")
            out.flush()
            try:
                session.ask(line)
            except ValueError as err:  # too long for the model, or a turn the template rejects
                out.write(f"(not asked: {err})")
            out.write("\n")


def _switch_image(session: ChatSession, path: str, out: TextIO) -> None:
    try:
        session.set_image(path)
    except (OSError, ImageDecodeError) as err:
        out.write(f"(cannot use image {path}: {err}; keeping the previous one)\n")
        return
    out.write(f"(image {path}; new conversation)\n")


@hydra_app("chat", schemas={"": ChatConfig})
def main(cfg: DictConfig) -> None:
    run(ChatConfig(**OmegaConf.to_container(cfg, resolve=True)))


if __name__ == "__main__":
    main()
