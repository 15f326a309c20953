"""AnyRes feature layout (LLaVA-NeXT): per-tile features -> one unpadded feature map with a newline per row.

The tower encodes each image as its whole view plus `rows x cols` tiles (`image_tiling.TileLayout.tiles`).
Per image, the tile features are laid out as the `rows*G x cols*G` feature map of the padded canvas, the rows or
columns that only covered the padding are cut (`unpad`), a learned `image_newline` column ends each row
(`newline`), and the map, read row by row, follows the whole view's `G*G` features. The result has exactly
`TileLayout.num_tokens(height, width)` vectors, the count the data pipeline expanded `<image>` to.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llava_lit.image_tiling import TileLayout


def pack_image_features(
    features: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    layout: TileLayout,
    newline: torch.Tensor | None,
) -> torch.Tensor:
    """All images' token vectors, image after image: [sum of num_tokens, D].

    `features` holds the projected features of every image's tiles, whole view first, image after image
    (`[sum of num_tiles, G*G, D]`); `image_sizes` the (height, width) of each original image; `newline` the
    learned row-end vector `[D]` (needed when `layout.settings.newline`).
    """
    grid = layout.feature_grid
    packed, start = [], 0
    for height, width in image_sizes:
        rows, cols = layout.grid(height, width)
        tiles = features[start : start + 1 + rows * cols]  # [1 + r*c, G*G, D]
        start += 1 + rows * cols
        whole, dim = tiles[0], tiles.shape[-1]  # [G*G, D]
        fmap = tiles[1:].view(rows, cols, grid, grid, dim)  # [r, c, G, G, D]
        fmap = fmap.permute(4, 0, 2, 1, 3).reshape(dim, rows * grid, cols * grid)  # [D, r*G, c*G]
        map_h, map_w = layout.feature_map_size(height, width)
        top, left = (rows * grid - map_h) // 2, (cols * grid - map_w) // 2
        fmap = fmap[:, top : top + map_h, left : left + map_w]  # [D, h, w]
        if layout.settings.newline:
            if newline is None:
                raise ValueError("anyres.newline is on but the model has no image_newline")
            column = newline.to(fmap.dtype)[:, None, None].expand(dim, map_h, 1)  # [D, h, 1]
            fmap = torch.cat([fmap, column], dim=2)  # [D, h, w + 1]
        packed += [whole, fmap.flatten(1).transpose(0, 1)]  # [G*G, D], [h * (w + 1), D]
    if start != features.shape[0]:
        raise ValueError(
            f"the image sizes call for {start} tiles but the tower encoded {features.shape[0]}; pixel_values and "
            "image_sizes do not describe the same images"
        )
    return torch.cat(packed, dim=0)  # [sum of num_tokens, D]
