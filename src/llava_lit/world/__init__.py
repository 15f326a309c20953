"""The offline miniature LLaVA world: synthetic scenes, their dialogues, and backbones pretrained on them.

`ensure_world(out_dir)` (in `build.py`) builds or reuses it; `python -m llava_lit.world` builds it from the
command line. See `build.py` for the output layout.
"""
