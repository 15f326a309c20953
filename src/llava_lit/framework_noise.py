"""Framework messages that carry no action for a llava_lit user, filtered where they are raised.

A first run should print the run's settings, its progress and its metrics. Each entry below names one message
the frameworks print on every run and why it does not apply to llava_lit; `verbose=true` on the command line
keeps them all.
"""

from __future__ import annotations

import logging
import warnings

WARNINGS: dict[str, str] = {
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": (
        "Lightning's own pytree helper calls an API that torch deprecates; nothing in a run can change it"
    ),
    r"Your `IterableDataset` has `__len__` defined": (
        "the shard stream splits shards over ranks and workers itself, so the length it reports is exact "
        "(llava_lit.datamodule)"
    ),
    r"`is_gradient_checkpointing` is deprecated": (
        "peft's adapter set-up asks transformers an API that transformers deprecates; nothing in a run can change it"
    ),
    r"Found \d+ module\(s\) in eval mode at the start of training": (
        "the frozen parts (the vision tower; the LLM in align) stay in eval mode on purpose (llava_lit.stages)"
    ),
}
"""Warning message patterns (regular expressions matched at the start) and why each is noise here."""

LOG_PREFIXES: dict[str, str] = {
    "💡 Tip: ": "Lightning's suggestions to install its cloud logging and model-registry packages",
}
"""Info-log prefixes of Lightning's rank-zero logger and why each is noise here."""

_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(tuple(LOG_PREFIXES))


def silence_framework_noise(verbose: bool = False) -> None:
    """Filter the messages in `WARNINGS` and `LOG_PREFIXES` for this process, unless `verbose`."""
    if verbose:
        return
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes())
