"""Peak memory of starting from one of our training checkpoints: `train init_from=<ckpt>` and `load_for_inference`.

    python benchmarks/bench_load_memory.py                       # this tree only
    python benchmarks/bench_load_memory.py --baseline-src /path/to/other/checkout/src   # and another tree

Builds, in a temporary folder, a random LLaMA (`--hidden`, `--layers`; the defaults give ~200M parameters) with a
tiny CLIP tower, and a Lightning-style checkpoint of the LLaVA around it holding the Adam moments of every trainable
tensor as a finetune checkpoint does (`--no-optimizer-state` leaves them out). Each measurement runs in a fresh
Python process against the given source tree: it loads the tokenizer, then does what that tree's `train.py` does
for `init_from=` (read the checkpoint, build the model with its weights) or what `load_for_inference` does, reads
every parameter once (as the first step would), and reports its peak resident memory (`VmHWM`) above the
resident memory it had after the imports, in multiples of the weights' size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, time
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

ckpt, mode = sys.argv[1], sys.argv[2]
import torch
from llava_lit.tokenization import load_tokenizer
from llava_lit.model.llava import LlavaModelConfig
config = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["llava_lit_config"]
model_cfg = LlavaModelConfig.from_data(config["model"], source=ckpt)
tokenizer = load_tokenizer(model_cfg.tokenizer_source)
del config
try:  # trees with the one checkpoint reader; older trees read through interop.pretrained
    from llava_lit.checkpoint_reader import read_checkpoint
    new_api = True
except ImportError:
    new_api = False
start_rss = status("VmRSS")
t0 = time.perf_counter()
if mode == "init_from":
    if new_api:
        pretrained = read_checkpoint(ckpt)
        model, _ = pretrained.build(tokenizer)
    else:
        from llava_lit.interop.pretrained import load_pretrained_llava
        pretrained = load_pretrained_llava(ckpt)
        model = pretrained.config.build(tokenizer)
        pretrained.load_into(model)
    del pretrained
else:
    from llava_lit.inference import load_for_inference
    model = load_for_inference(ckpt).model
seconds = time.perf_counter() - t0
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())  # every weight read once
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_above_start": status("VmHWM") - start_rss, "weights": weights, "seconds": seconds}))
"""


def build_checkpoint(root: Path, hidden: int, layers: int, optimizer_state: bool) -> tuple[Path, int]:
    """A random LLaMA + tiny CLIP saved as HF folders, and a training checkpoint of the LLaVA around them."""
    import mistral_common
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from llava_lit.model.llava import LlavaModelConfig
    from llava_lit.tokenization import load_tokenizer

    torch.manual_seed(0)
    clip = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    CLIPVisionModel(clip).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(
        root / "clip"
    )
    llm = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=2048,
    )
    LlamaForCausalLM(llm).save_pretrained(root / "llm")
    tokenizer_model = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copy(tokenizer_model, root / "llm" / "tokenizer.model")
    node = {
        "vision_tower": {"name_or_path": str(root / "clip"), "backend": "hf_clip", "pretrained": True},
        "projector": "mlp2x_gelu",
        "language_model": {"name_or_path": str(root / "llm"), "pretrained": True, "dtype": "float32"},
    }
    config = LlavaModelConfig.from_data(node, source="benchmark")
    model = config.build(load_tokenizer(str(root / "llm")))
    state = {"model." + k: v for k, v in model.state_dict().items()}
    trainable = [p for name, p in model.named_parameters() if not name.startswith("vision_tower.")]
    optimizer = {"state": {}, "param_groups": [{"params": list(range(len(trainable)))}]}
    if optimizer_state:
        optimizer["state"] = {
            i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            for i, p in enumerate(trainable)
        }
    run_config = {
        "run_name": "bench",
        "stage": {"name": "finetune"},
        "model": config.to_node(),
        "data": {"template": "vicuna_v1", "image_aspect": "pad", "max_length": 2048},
    }
    path = root / "last.ckpt"
    checkpoint = {"state_dict": state, "optimizer_states": [optimizer], "llava_lit_config": run_config}
    torch.save(checkpoint, path)
    return path, sum(p.numel() for p in model.parameters())


def measure(src: Path, checkpoint: Path, mode: str) -> dict[str, float]:
    """Run `MEASURE` in a fresh process importing llava_lit from `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint), mode],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"measurement with {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024, help="LLaMA hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=12, help="LLaMA decoder layers")
    parser.add_argument("--no-optimizer-state", action="store_true", help="checkpoint without Adam moments")
    parser.add_argument("--baseline-src", type=Path, help="another tree's src/ to measure beside this one")
    args = parser.parse_args()
    trees = [("this tree", REPO / "src")]
    if args.baseline_src:
        trees.insert(0, ("baseline", args.baseline_src))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, params = build_checkpoint(
            Path(tmp), args.hidden, args.layers, not args.no_optimizer_state
        )
        size = checkpoint.stat().st_size
        print(f"model: {params / 1e6:.0f}M parameters; checkpoint file {size / 2**30:.2f} GiB")
        print(f"{'tree':<10} {'path':<18} {'peak above start':>17} {'x weights':>10} {'load s':>7}")
        for name, src in trees:
            for mode in ("init_from", "load_for_inference"):
                result = measure(src, checkpoint, mode)
                peak = result["peak_above_start"]
                print(
                    f"{name:<10} {mode:<18} {peak / 2**30:>13.2f} GiB {peak / result['weights']:>10.2f} "
                    f"{result['seconds']:>7.1f}"
                )


if __name__ == "__main__":
    main()
