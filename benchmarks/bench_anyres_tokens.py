"""What AnyRes tiling costs per image: tower views and LLM image tokens, LLaVA-NeXT grids against LLaVA-1.5.

    python benchmarks/bench_anyres_tokens.py                      # CLIP-L/14-336, LLaVA-NeXT pinpoints
    python benchmarks/bench_anyres_tokens.py --no-unpad --no-newline

Counts come from `image_tiling.TileLayout`, the arithmetic the data pipeline expands `<image>` with (equal to
transformers' LlavaNextProcessor, tests/data/test_image_tiling.py). The tower's cost grows with the views (each a
full 336-px forward); the LLM's with the tokens, and its attention with their square.
"""

from __future__ import annotations

import argparse

from llava_lit.image_tiling import LLAVA_NEXT_PINPOINTS, AnyResSettings, TileLayout

SIZES = {
    "square 336x336": (336, 336),
    "square 1024x1024": (1024, 1024),
    "photo 480x640 (4:3)": (480, 640),
    "photo 768x1024 (4:3)": (768, 1024),
    "video frame 1080x1920": (1080, 1920),
    "portrait 1920x1080": (1920, 1080),
    "document 2200x1700": (2200, 1700),
    "receipt 2000x400": (2000, 400),
    "banner 300x1200": (300, 1200),
}
"""Image sizes as (height, width)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=336, help="the tower's input side in pixels")
    parser.add_argument("--feature-grid", type=int, default=24, help="feature rows per tile (336 / 14)")
    parser.add_argument("--no-unpad", action="store_true", help="keep the padding's feature rows/columns")
    parser.add_argument("--no-newline", action="store_true", help="no newline token per feature row")
    args = parser.parse_args()
    settings = AnyResSettings(unpad=not args.no_unpad, newline=not args.no_newline)
    if args.base != 336:
        settings.grid_pinpoints = [
            [h * args.base // 336, w * args.base // 336] for h, w in LLAVA_NEXT_PINPOINTS
        ]
    layout = TileLayout(settings, base=args.base, feature_grid=args.feature_grid)
    one_view = args.feature_grid**2
    print(f"AnyRes: pinpoints {settings.grid_pinpoints}, unpad={settings.unpad}, newline={settings.newline}")
    print(f"one view per image (LLaVA-1.5): 1 tower view, {one_view} tokens\n")
    print("| image | grid | tower views | image tokens | x LLaVA-1.5 tokens |")
    print("|---|---|---|---|---|")
    for name, (height, width) in SIZES.items():
        rows, cols = layout.grid(height, width)
        tokens = layout.num_tokens(height, width)
        print(
            f"| {name} | {rows}x{cols} | {layout.num_tiles(height, width)} | {tokens} | {tokens / one_view:.2f} |"
        )


if __name__ == "__main__":
    main()
