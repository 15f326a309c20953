"""Training-step throughput and MFU of real LLaVA shapes on one GPU, across compile / checkpointing / fused loss /
packing.

    python benchmarks/bench_gpu.py                      # 1B and 7B LLaVA-1.5 shapes, both stages, every setting
    python benchmarks/bench_gpu.py --models 1b --stages finetune --settings compile+fused compile+fused+packed
    python benchmarks/bench_gpu.py --tiny               # tiny shapes on the CPU, a few steps (CI runs this)

Nothing is downloaded: the models are built by the project's own `LlavaModelConfig.build` with `pretrained: false`
and `config_path` pointing at `conf/hf_configs/` (CLIP ViT-L/14-336 -> `mlp2x_gelu` -> TinyLlama-1.1B's shape
(2048 wide, 22 layers, 32 heads, 4 KV heads) or Vicuna-7B v1.5's), random weights built on the device; the
tokenizer is the 32k LLaMA-style SentencePiece model that `mistral-common` ships (a dev dependency), grown by
`<image>` and `<pad>` and the embeddings padded to 32064 as for Vicuna. Each stage applies its own freezing rule
(`stages.set_trainable`) and steps through `LlavaLitModule.loss` (logits or fused loss) + backward + AdamW under
bf16 autocast, with fp32 master weights as `trainer=gpu` (`bf16-mixed`) trains them.

Settings: `compile` = `module.compile_blocks` (`compile_decoder_layers`), `ckpt` = activation checkpointing of the
LLM decoder layers as `module.sharding.activation_checkpointing` enables it, `fused` = `module.fused_loss`;
`packed` = the micro-batch's samples laid into rows of up to 2048 tokens as `data.packing` lays them
(`packing.pack_into_batches` + `collate.collate_packed`: position ids restart per sample, no attention across
samples), else right-padded by `collate`.
Compiling is in place, so eager settings run first and then the compiled ones, in one process per model size (a
crash or OOM of the 7B cannot lose the 1B's rows). A setting that runs out of memory is reported as OOM.

Synthetic batches of realistic lengths, the same samples for every setting of a stage:
- align (LCS-558K captions): every sample one image (576 tokens) + a caption of 8-48 tokens; micro-batch 32.
- finetune (mix665k conversations): a 35-token system prompt, one image (576 tokens; one sample in 16 is
  text-only), a conversation of 40-700 tokens, answers (the last 60 %) supervised; micro-batch 16.
These are LLaVA-1.5's per-device batches (8 GPUs, global 256 / 128). Tokens/s counts real (unpadded) tokens;
TFLOP/s and MFU use `llava_lit.flops.StepFlops` (model FLOPs over real lengths) and the dense bf16 peak of
`llava_lit.flops.PEAK_BF16_FLOPS` (`--peak-tflops` overrides it; no MFU on the CPU without it).

Timing: `--warmup` steps (compilation happens there) are excluded; the mean of `--steps` timed steps is reported.
`--budget-s` stops starting new settings once the run has taken that long (the rest are reported as skipped), so
the default run fits in 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
HF_CONFIGS = ROOT / "conf" / "hf_configs"
CLIP_336 = HF_CONFIGS / "clip-vit-large-patch14-336.json"
LLM_CONFIGS = {"1b": HF_CONFIGS / "tinyllama-1.1b.json", "7b": HF_CONFIGS / "vicuna-7b-v1.5.json"}
"""The LLM shape of each `--models` choice (the tower is CLIP ViT-L/14-336 for both)."""


@dataclass(frozen=True)
class Setting:
    """One timed configuration of a training step."""

    compile: bool
    """Compile each LLM decoder layer (`module.compile_blocks`)."""
    ckpt: bool
    """Activation checkpointing of the LLM decoder layers."""
    fused: bool
    """The fused LM-head + cross-entropy loss (`module.fused_loss`)."""
    packing: str = "padded"
    """Batch layout passed to `build_batch`: `padded` or `packed`."""

    @property
    def name(self) -> str:
        parts = ["compile" if self.compile else "eager"] + ["ckpt"] * self.ckpt + ["fused"] * self.fused
        return "+".join(parts + ["packed"] * (self.packing == "packed"))

    @classmethod
    def parse(cls, name: str) -> Setting:
        """`eager` or `compile`, then any of `+ckpt`, `+fused`, `+packed` (e.g. `compile+ckpt+fused+packed`)."""
        head, *flags = name.split("+")
        if head not in ("eager", "compile") or set(flags) - {"ckpt", "fused", "packed"}:
            raise argparse.ArgumentTypeError(f"bad setting {name!r}: eager|compile[+ckpt][+fused][+packed]")
        packing = "packed" if "packed" in flags else "padded"
        return cls(compile=head == "compile", ckpt="ckpt" in flags, fused="fused" in flags, packing=packing)


ALL_SETTINGS = [Setting(c, k, f) for c in (False, True) for k in (False, True) for f in (False, True)] + [
    Setting(False, False, False, "packed"),
    Setting(True, False, True, "packed"),
    Setting(True, True, True, "packed"),
]
"""The default run: every padded combination, and packing beside eager and the two fastest compiled ones."""

PACKED_ROW_TOKENS = 2048
"""Row capacity of packed batches (`data.max_length` of the LLaVA-1.5 recipes)."""


@dataclass(frozen=True)
class StageBatches:
    """How a stage's synthetic samples look (see the module docstring)."""

    micro_batch: int
    prompt: int  # text tokens before the image
    text: tuple[int, int]  # inclusive range of text tokens after the image
    text_only_every: int  # every n-th sample has no image (0: never)


STAGE_BATCHES = {
    "align": StageBatches(micro_batch=32, prompt=0, text=(8, 48), text_only_every=0),
    "finetune": StageBatches(micro_batch=16, prompt=35, text=(40, 700), text_only_every=16),
}
TINY_STAGE_BATCHES = {
    "align": StageBatches(micro_batch=4, prompt=0, text=(8, 24), text_only_every=0),
    "finetune": StageBatches(micro_batch=4, prompt=8, text=(20, 80), text_only_every=4),
}


def build_batch(
    shape: StageBatches, *, image_token_id: int, image_tokens: int, image_size: int, seed: int, packing: str
) -> dict[str, Any]:
    """One synthetic micro-batch through the project's collate; `packing` picks the layout (`padded`, `packed`)."""
    import torch

    from llava_lit.collate import collate, collate_packed
    from llava_lit.constants import IGNORE_INDEX
    from llava_lit.packing import pack_into_batches

    if packing not in ("padded", "packed"):
        raise ValueError(f"packing {packing!r}: expected padded or packed")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for k in range(shape.micro_batch):
        with_image = not shape.text_only_every or (k + 1) % shape.text_only_every != 0
        n_text = rng.randint(*shape.text)
        prompt = torch.randint(3, 32000, (1 + shape.prompt,), generator=gen)  # BOS slot + prompt
        prompt[0] = 1
        image = torch.full((image_tokens if with_image else 0,), image_token_id)
        text = torch.randint(3, 32000, (n_text,), generator=gen)
        ids = torch.cat([prompt, image, text])
        labels = torch.full_like(ids, IGNORE_INDEX)
        answer = int(n_text * 0.6) if shape.prompt else n_text  # captions are all supervised
        labels[len(ids) - answer :] = ids[len(ids) - answer :]
        pixels = torch.randn(1, 3, image_size, image_size, generator=gen) if with_image else None
        samples.append({"id": str(k), "input_ids": ids, "labels": labels, "pixel_values": pixels})
    if packing == "padded":
        return collate(samples, pad_token_id=0)
    lengths = [len(s["input_ids"]) for s in samples]
    (rows,) = pack_into_batches(lengths, max(PACKED_ROW_TOKENS, max(lengths)), num_batches=1)
    return collate_packed([[samples[i] for i in row] for row in rows], pad_token_id=0)


def tiny_configs(folder: Path) -> tuple[Path, Path]:
    """Tiny CLIP (56 px, 16 image tokens) and LLaMA (64 wide, GQA) config files for `--tiny`."""
    from transformers import CLIPVisionConfig, LlamaConfig

    clip = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    llama = LlamaConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    clip.to_json_file(folder / "clip.json")
    llama.to_json_file(folder / "llm.json")
    return folder / "clip.json", folder / "llm.json"


def load_bench_tokenizer(folder: Path):
    """The 32k LLaMA-style SentencePiece tokenizer of `mistral-common`, with `<image>` and `<pad>` added."""
    import mistral_common

    from llava_lit.tokenization import load_tokenizer

    shutil.copy(
        Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model"
    )
    return load_tokenizer(str(folder))


def build_model(vision_config: Path, llm_config: Path, tokenizer, device, attn: str):
    """A `LlavaModel` with random weights from config files, built directly on `device`."""
    import torch

    from llava_lit.model.language_model import LanguageModelConfig
    from llava_lit.model.llava import LlavaModelConfig
    from llava_lit.model.vision_tower import VisionTowerConfig

    config = LlavaModelConfig(
        vision_tower=VisionTowerConfig(
            name_or_path="openai/clip-vit-large-patch14-336", pretrained=False, config_path=str(vision_config)
        ),
        projector="mlp2x_gelu",
        language_model=LanguageModelConfig(
            name_or_path="lmsys/vicuna-7b-v1.5",
            pretrained=False,
            config_path=str(llm_config),
            dtype="float32",
            attn_implementation=attn,
        ),
    )
    with torch.device(device):
        return config.build(tokenizer)


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def time_setting(
    module, batches: list[dict], setting: Setting, warmup: int, device, amp_dtype
) -> dict[str, Any]:
    """Run one step per batch under `setting`: status, seconds of the steps after `warmup`, peak GPU memory."""
    import torch

    from llava_lit.sharding import set_activation_checkpointing

    model = module.model
    module.fused_loss = setting.fused
    set_activation_checkpointing(model, setting.ckpt)  # as `module.sharding.activation_checkpointing` does
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    status, loss = "ok", None
    try:
        for batch in batches:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = module.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            status = f"error: loss is {float(loss)}"
    except Exception as err:  # noqa: BLE001 - every failure becomes a row, the other settings still run
        status = "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    del optimizer, loss
    model.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"status": status, "times": times[warmup:], "peak_memory_gib": peak}


def run_model(args: argparse.Namespace, model_name: str, started: float) -> list[dict[str, Any]]:
    """Every (stage, setting) of one model size, in this process; one result row each."""
    import torch

    from llava_lit.flops import StepFlops, peak_flops_for_device
    from llava_lit.module import LlavaLitModule, compile_decoder_layers
    from llava_lit.stages import set_trainable, trainable_modules

    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        # Tiny matmuls gain nothing from more threads, and on a shared machine extra OpenMP threads spin-wait.
        torch.set_num_threads(1)
    amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    try:
        tokenizer = load_bench_tokenizer(work)
        if args.tiny:
            vision_config, llm_config = tiny_configs(work)
        else:
            vision_config, llm_config = CLIP_336, LLM_CONFIGS[model_name]
        torch.manual_seed(0)
        model = build_model(vision_config, llm_config, tokenizer, device, "eager" if args.tiny else "sdpa")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    module = LlavaLitModule(model, torch.optim.AdamW)
    if args.peak_tflops is not None:
        peak = args.peak_tflops * 1e12
    else:
        peak = peak_flops_for_device(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    image_size = model.vision_tower.image_processor.crop_size["height"]
    shapes = TINY_STAGE_BATCHES if args.tiny else STAGE_BATCHES
    rows = []
    compiled = False
    for setting in sorted(args.settings, key=lambda s: s.compile):  # compiling is in place: eager first
        if setting.compile and not compiled:
            compile_decoder_layers(model)
            compiled = True
        for stage in args.stages:
            row = {"model": model_name, "stage": stage, **asdict(setting), "setting": setting.name}
            rows.append(row)
            if time.perf_counter() - started > args.budget_s:
                row["status"] = "skipped (time budget)"
                continue
            set_trainable(model, trainable_modules(stage))
            flops = StepFlops.from_model(model)
            batches = [
                build_batch(
                    shapes[stage],
                    image_token_id=model.image_token_id,
                    image_tokens=model.num_image_tokens,
                    image_size=image_size,
                    seed=1000 * i + 7,
                    packing=setting.packing,
                )
                for i in range(args.warmup + args.steps)
            ]
            batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
            result = time_setting(module, batches, setting, args.warmup, device, amp_dtype)
            row.update(status=result["status"], peak_memory_gib=result["peak_memory_gib"])
            if result["status"] != "ok":
                continue
            timed, elapsed = batches[args.warmup :], sum(result["times"])
            flops_done = sum(flops.batch(b) for b in timed)
            row["step_s"] = elapsed / len(timed)
            row["tokens_per_s"] = sum(int(b["attention_mask"].sum()) for b in timed) / elapsed
            row["samples_per_s"] = sum(len(b["ids"]) for b in timed) / elapsed
            row["tflops_per_s"] = flops_done / elapsed / 1e12
            row["mfu"] = flops_done / elapsed / peak if peak else None
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as one aligned text table."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = f"{'model':>5} {'stage':>8} {'setting':>26} {'packing':>7} {'tokens/s':>9} {'samples/s':>9} "
    header += f"{'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8} {'step s':>7}  status"
    lines = [header]
    for r in rows:
        ok = r.get("status") == "ok"
        lines.append(
            f"{r['model']:>5} {r['stage']:>8} {r['setting']:>26} {r['packing']:>7} "
            f"{num(r.get('tokens_per_s') if ok else None, '9.0f'):>9} "
            f"{num(r.get('samples_per_s') if ok else None, '9.2f'):>9} "
            f"{num(r.get('tflops_per_s') if ok else None, '8.4g'):>8} "
            f"{num(r.get('mfu') if ok else None, '6.1%'):>6} "
            f"{num(r.get('peak_memory_gib'), '8.1f'):>8} "
            f"{num(r.get('step_s') if ok else None, '7.3f'):>7}  {r.get('status', '?')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (fp32, eager settings)")
    parser.add_argument("--models", nargs="+", choices=sorted(LLM_CONFIGS), default=["1b", "7b"])
    parser.add_argument("--stages", nargs="+", choices=["align", "finetune"], default=["align", "finetune"])
    parser.add_argument(
        "--settings", nargs="+", type=Setting.parse, help="default: ALL_SETTINGS (tiny: the eager ones)"
    )
    parser.add_argument("--warmup", type=int, help="untimed steps per setting (default 3; tiny 1)")
    parser.add_argument("--steps", type=int, help="timed steps per setting (default 4; tiny 2)")
    parser.add_argument(
        "--precision", choices=["bf16", "fp32"], help="autocast dtype (default bf16; tiny fp32)"
    )
    parser.add_argument(
        "--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: the GPU's dense bf16)"
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no new setting after this long")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--one-model", help=argparse.SUPPRESS)  # run one model size in this process
    args = parser.parse_args(argv)
    if args.settings is None:
        args.settings = [s for s in ALL_SETTINGS if not (args.tiny and s.compile)]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 4)
    args.precision = args.precision or ("fp32" if args.tiny else "bf16")
    started = time.perf_counter()

    if args.tiny or args.one_model:
        rows = run_model(args, "tiny" if args.tiny else args.one_model, started)
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --tiny for the CPU smoke run")
        rows = []
        for name in args.models:  # one process per model size: an OOM or crash stays there
            out = Path(tempfile.gettempdir()) / f"bench_gpu_{os.getpid()}_{name}.json"
            cmd = [sys.executable, __file__, f"--one-model={name}", f"--json={out}", "--stages", *args.stages]
            cmd += ["--settings", *(s.name for s in args.settings), f"--warmup={args.warmup}"]
            cmd += [f"--steps={args.steps}", f"--precision={args.precision}"]
            cmd += [f"--budget-s={max(1.0, args.budget_s - (time.perf_counter() - started))}"]
            if args.peak_tflops is not None:
                cmd.append(f"--peak-tflops={args.peak_tflops}")
            proc = subprocess.run(cmd, check=False)
            if proc.returncode != 0 or not out.exists():
                rows.append(
                    {"model": name, "stage": "-", "setting": "-", "packing": "-", "status": "crashed"}
                )
                continue
            rows += json.loads(out.read_text())
            out.unlink()
    if not args.one_model:
        print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
