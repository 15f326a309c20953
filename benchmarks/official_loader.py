"""Times the official LLaVA data path: `LazySupervisedDataset` + `DataCollatorForSupervisedDataset` in a DataLoader.

Run by `bench_data.py --official-repo` with the interpreter of a venv that can import the official code
(transformers 4.37-era); it imports `llava.train.train` from the checkout on `PYTHONPATH` and never from this
project. Prints one JSON line per pass: seconds, samples, and CPU seconds of this process and its (joined)
DataLoader workers.

    PYTHONPATH=/path/to/LLaVA python benchmarks/official_loader.py --data data.json --images images/ \\
        --tokenizer tok/ --processor proc/ --passes 1
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="LLaVA JSON list")
    parser.add_argument("--images", required=True, help="image folder")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (SentencePiece tokenizer.model)")
    parser.add_argument("--processor", required=True, help="folder with the CLIP preprocessor_config.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()

    import torch
    import transformers
    from llava import conversation as conversation_lib
    from llava.train.train import DataArguments, DataCollatorForSupervisedDataset, LazySupervisedDataset
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    # As `llava/train/train.py` sets them up for a Vicuna-v1 run (`--version v1`, `--image_aspect_ratio pad`);
    # its `AutoTokenizer(use_fast=False)` resolves to this class for a LLaMA checkpoint.
    tokenizer = transformers.LlamaTokenizer.from_pretrained(
        args.tokenizer, model_max_length=args.max_length, padding_side="right", use_fast=False
    )
    tokenizer.pad_token = tokenizer.unk_token
    conversation_lib.default_conversation = conversation_lib.conv_templates["vicuna_v1"]
    data_args = DataArguments(data_path=args.data, lazy_preprocess=True, is_multimodal=True)
    data_args.image_folder = args.images
    data_args.image_aspect_ratio = "pad"
    data_args.image_processor = transformers.CLIPImageProcessor.from_pretrained(args.processor)
    data_args.mm_use_im_start_end = False
    dataset = LazySupervisedDataset(tokenizer=tokenizer, data_path=args.data, data_args=data_args)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=DataCollatorForSupervisedDataset(tokenizer=tokenizer),
    )
    for _ in range(args.passes):
        cpu0, start, count = cpu_seconds(), time.perf_counter(), 0
        for batch in loader:
            count += len(batch["input_ids"])
        seconds = time.perf_counter() - start
        print(
            json.dumps({"seconds": seconds, "samples": count, "cpu_seconds": cpu_seconds() - cpu0}),
            flush=True,
        )


if __name__ == "__main__":
    main()
