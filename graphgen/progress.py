"""Progress bar for generate(): tokens done, block, rate and ETA; silent when stderr is not a terminal."""
from __future__ import annotations

import sys

from tqdm import tqdm

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} tok [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class Progress:
    """Counts squares as they finish; shows them as tokens (one square = batch / num_layers tokens).

    Passed to the executor as its on_compute callback. tqdm(disable=None) turns itself off
    when stderr is not a TTY (logs, CI, pipes); `delay` keeps short calls silent too.
    """

    def __init__(self, n_blocks: int, block_tokens: int, squares_per_block: int, enabled: bool = True,
                 delay: float = 1.0):
        self.n_blocks, self.block = n_blocks, 0
        self.per_square = block_tokens / max(1, squares_per_block)
        self.bar = tqdm(total=n_blocks * block_tokens, desc="generate", unit="tok", leave=False,
                        disable=None if enabled else True, delay=delay, file=sys.stderr,
                        bar_format=BAR_FORMAT, dynamic_ncols=True)
        self.start_block(0)

    def start_block(self, b: int) -> None:
        self.block = b
        self.bar.set_postfix_str(f"block {b + 1}/{self.n_blocks}", refresh=False)

    def __call__(self, node) -> None:
        self.bar.update(self.per_square)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
