"""lm-evaluation-harness backend: `python -m graphgen.lm_eval --tasks ... --model_args pretrained=DIR`.

Importing graphgen.lm_eval.model registers the model name `graphgen` with lm-eval; see
docs/evaluation.md. (This package needs the `eval` extra: pip install graphgen[eval].)
"""
