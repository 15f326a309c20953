"""The Hydra config tree of llava_lit, shipped in the package as `llava_lit.conf` (`pkg://llava_lit.conf`)."""
