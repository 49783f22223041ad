"""python -m graphgen.lm_eval: lm-eval's own command line with the model fixed to graphgen.

    python -m graphgen.lm_eval --tasks hellaswag --model_args pretrained=DIR,policy.gpu_batch_size=8 \
        --batch_size 8 --limit 100 --output_path results/

Every flag is lm-eval's (`lm-eval run --help`); --model_args keys other than pretrained are
graphgen config overrides. `ls` and `validate` pass through to lm-eval unchanged.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence

from lm_eval.__main__ import cli_evaluate

from . import model  # noqa: F401 (registers the `graphgen` model with lm-eval)


def lm_eval_argv(argv: Sequence[str]) -> List[str]:
    """Our arguments -> lm-eval's, with `run --model graphgen` in front (an error if --model is given)."""
    argv = list(argv)
    if argv and argv[0] in ("ls", "validate"):
        return argv
    if argv and argv[0] == "run":
        argv = argv[1:]
    given = [a for a in argv if a in ("--model", "-M") or a.startswith("--model=")]
    if given:
        raise SystemExit("python -m graphgen.lm_eval runs graphgen: drop --model (use lm-eval itself for other "
                         "backends); graphgen settings go in --model_args pretrained=DIR,key=value,...")
    if not argv or argv[0] in ("-h", "--help"):
        return ["run", "--help"]
    return ["run", "--model", "graphgen", *argv]


def main(argv: Optional[Sequence[str]] = None) -> None:
    sys.argv = ["lm-eval", *lm_eval_argv(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
