"""Checkpoint interoperability: export to transformers' LLaVA, import official LLaVA and llava-hf checkpoints.

- `export_hf.export_hf_llava`: a `LlavaModel` + tokenizer -> a folder that `LlavaForConditionalGeneration` and
  `LlavaProcessor` load (weights, config, tokenizer, image processor, chat template, model card); an AnyRes model
  -> `LlavaNextForConditionalGeneration` and `LlavaNextProcessor`.
- `llava_next`: AnyRes (LLaVA-NeXT) in transformers' and the official LLaVA-1.6 terms, both ways.
- `import_hf`, `import_official`: a transformers LLaVA / LLaVA-NeXT folder, an official LLaVA (1.5 or 1.6)
  folder or stage-1 projector -> a `pretrained.PretrainedLlava`; `llava_lit.checkpoint_reader` decides which
  applies.
- `pretrained.PretrainedLlava`: a model's settings and weights, and `build`, the loader that holds them once.
"""
