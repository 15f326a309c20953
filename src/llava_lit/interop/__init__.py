"""Checkpoint interoperability: export to transformers' LLaVA, import official LLaVA and llava-hf checkpoints.

- `export_hf.export_hf_llava`: a `LlavaModel` + tokenizer -> a folder that `LlavaForConditionalGeneration` and
  `LlavaProcessor` load (weights, config, tokenizer, image processor, chat template, model card).
- `training_checkpoint.read_training_checkpoint`: a Lightning checkpoint (file or FSDP2 directory) -> run config +
  `LlavaModel` state dict.
- `pretrained.read_checkpoint`: an official LLaVA checkpoint, an `mm_projector.bin`, a llava-hf folder or one
  of our training checkpoints -> a `model` config node + state dict to start training or inference from.
"""
