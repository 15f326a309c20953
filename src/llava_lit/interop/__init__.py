"""Checkpoint interoperability: export to transformers' LLaVA, import official LLaVA and llava-hf checkpoints.

- `export_hf.export_hf_llava`: a `LlavaModel` + tokenizer -> a folder that `LlavaForConditionalGeneration` and
  `LlavaProcessor` load (weights, config, tokenizer, image processor, chat template, model card).
- `import_hf`, `import_official`: a transformers LLaVA folder / an official LLaVA folder or stage-1 projector -> a
  `pretrained.PretrainedLlava`; `llava_lit.checkpoint_reader` decides which applies.
- `pretrained.PretrainedLlava`: a model's settings and weights, and `build`, the loader that holds them once.
"""
