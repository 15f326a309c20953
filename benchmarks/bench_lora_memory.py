"""Training memory of full finetuning, LoRA and QLoRA for LLaVA-1.5-7B/13B: weights, gradients, optimizer states.

    python benchmarks/bench_lora_memory.py            # both sizes, r=128
    python benchmarks/bench_lora_memory.py --sizes 7b --rank 64

The LLM (Vicuna v1.5, `conf/hf_configs/`, embeddings grown to 32064 rows as training does) and the `mlp2x_gelu`
projector are built on the meta device and wrapped with peft exactly as `module.lora` does (`lora.add_adapters`'
`get_peft_model`), so parameter counts come from the actual modules. Bytes per element of what bitsandbytes stores
are measured on real tensors here: an NF4 weight with double quantization (packed 4-bit values + quantized block
scales) and AdamW8bit's moments (8-bit values + block scales), each on a 4096 x 4096 tensor; tensors under
bitsandbytes' `min_8bit_size` (4096 elements) keep fp32 moments. The frozen CLIP tower (0.30 B parameters, 0.6 GB in
bf16) and activations are the same for every method and left out.

Layouts counted:
- full: trainable LLM + projector as bf16 compute weights beside fp32 master weights, fp32 gradients
  (FSDP2's `param_dtype: bfloat16` with fp32 sharded masters; the total is what all ranks hold together);
- LoRA: the frozen LLM in bf16, adapters + projector in fp32 with fp32 gradients;
- QLoRA: the adapted linear layers in NF4, the rest of the base (embeddings, LM head, norms) in bf16, adapters +
  projector in fp32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from llava_lit.lora import LoraSettings, peft_config
from llava_lit.model.projector import build_projector

HF_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "hf_configs"
LLMS = {"7b": "vicuna-7b-v1.5.json", "13b": "vicuna-13b-v1.5.json"}
VISION_WIDTH = 1024  # CLIP ViT-L/14-336
VOCAB = 32064  # 32000 + <image>, <pad>, padded to a multiple of 64
MIN_8BIT_SIZE = 4096
GB = 1e9


def measured_nf4_bytes_per_element() -> float:
    """Bytes bitsandbytes stores per weight element in NF4 with double quantization (values + scales)."""
    import bitsandbytes.functional as bnbf

    weight = torch.randn(4096, 4096)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    tensors = [packed, state.absmax, state.code, state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors) / weight.numel()


def measured_adamw8bit_bytes_per_element() -> float:
    """Bytes of AdamW8bit's state per parameter element (both moments and their block scales)."""
    import bitsandbytes as bnb

    param = nn.Parameter(torch.zeros(4096, 4096))
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-3)
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = optimizer.state[param]
    per_param = [v for k, v in state.items() if torch.is_tensor(v) and not k.startswith("qmap")]
    return sum(t.numel() * t.element_size() for t in per_param) / param.numel()


def build(size: str, rank: int | None) -> tuple[nn.Module, nn.Module]:
    """The LLM (peft-wrapped when `rank` is set) and the projector, on the meta device, LLM in bf16."""
    config = AutoConfig.from_pretrained(str(HF_CONFIGS / LLMS[size]))
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        llm.resize_token_embeddings(VOCAB, mean_resizing=False)
        projector = build_projector("mlp2x_gelu", VISION_WIDTH, config.hidden_size)
        if rank is not None:
            from peft import get_peft_model

            llm = get_peft_model(llm, peft_config(LoraSettings(enabled=True, r=rank, alpha=2 * rank)))
    return llm, projector


def table(sizes: list[str], rank: int) -> list[dict[str, object]]:
    nf4 = measured_nf4_bytes_per_element()
    adam8 = measured_adamw8bit_bytes_per_element()
    rows = []
    for size in sizes:
        full_llm, projector = build(size, None)
        lora_llm, _ = build(size, rank)
        projector_n = sum(p.numel() for p in projector.parameters())
        full_n = sum(p.numel() for p in full_llm.parameters()) + projector_n
        full_tensors = [p.numel() for p in full_llm.parameters()] + [
            p.numel() for p in projector.parameters()
        ]
        adapters = [p.numel() for n, p in lora_llm.named_parameters() if "lora_" in n]
        trained = adapters + [p.numel() for p in projector.parameters()]
        frozen = {n: p.numel() for n, p in lora_llm.named_parameters() if "lora_" not in n}
        adapted_base = sum(
            n for name, n in frozen.items() if ".base_layer." in name and name.endswith("weight")
        )
        other_base = sum(frozen.values()) - adapted_base

        def adam(tensors: list[int], eight_bit: bool) -> float:
            if not eight_bit:
                return 8.0 * sum(tensors)
            return sum(n * adam8 if n >= MIN_8BIT_SIZE else 8.0 * n for n in tensors)

        methods = {
            "full": (full_n * (2 + 4), 4 * full_n, full_tensors, full_n),
            f"LoRA r={rank}": (
                2 * sum(frozen.values()) + 4 * sum(trained),
                4 * sum(trained),
                trained,
                sum(trained),
            ),
            f"QLoRA NF4 r={rank}": (
                nf4 * adapted_base + 2 * other_base + 4 * sum(trained),
                4 * sum(trained),
                trained,
                sum(trained),
            ),
        }
        for method, (weights, grads, tensors, n_trained) in methods.items():
            for optimizer in ("AdamW", "AdamW8bit"):
                states = adam(tensors, optimizer == "AdamW8bit")
                rows.append(
                    {
                        "model": f"LLaVA-1.5-{size.upper()}",
                        "method": method,
                        "optimizer": optimizer,
                        "trained_params": n_trained,
                        "weights_gb": weights / GB,
                        "grads_gb": grads / GB,
                        "optimizer_gb": states / GB,
                        "total_gb": (weights + grads + states) / GB,
                    }
                )
    print(f"measured: NF4 (double quant) {nf4:.4f} bytes/weight, AdamW8bit {adam8:.4f} bytes/parameter")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["7b", "13b"], choices=sorted(LLMS))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = table(args.sizes, args.rank)
    print(
        "| model | method | optimizer | trained params | weights GB | gradients GB | optimizer GB | total GB |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['method']} | {r['optimizer']} | {r['trained_params'] / 1e6:,.1f} M | "
            f"{r['weights_gb']:.1f} | {r['grads_gb']:.2f} | {r['optimizer_gb']:.2f} | {r['total_gb']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
