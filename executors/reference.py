"""Reference executor: runs the compiled schedule op by op, synchronously. The oracle."""
from __future__ import annotations

from .base import Executor


class ReferenceExecutor(Executor):
    name = "reference"

    def run_ops(self, ops) -> None:
        for node in ops:
            self.execute(node)
