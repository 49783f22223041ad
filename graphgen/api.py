"""Hugging Face style Python API: LLM(model, overrides).generate(...)."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from executors import BlockInputs, make_executor
from . import distributed
from .compile import BlockShape, checkpoint_of, compile, model_name, spec_for
from .chat_template import chat_ids, check_messages, end_of_turn_ids, is_messages
from .config import CONF_DIR, Config, check_config, compose
from .inputs import check_generate_args
from .models.gguf import is_gguf, load as load_gguf, tokenizer as gguf_tokenizer
from .models.weights import CheckpointWeights, DummyWeights, WeightSource, describe_missing
from .perf.optimize import resolve_policy
from . import scoring
from .progress import Progress
from .sampling import Sampling
from .session import ChatSession
from .stopping import finish
from .report.metrics import trace_metrics


GRAPH_CACHE = 4  # compiled graphs kept per LLM (one per prompt length / batch shape)


class LLM:
    """A model compiled and run by graphgen.

    model: a config name under conf/model (e.g. "opt-1.3b") or a local HF checkpoint dir.
    overrides: the same strings the CLI takes ("schedule=row", "model.dtype=float32", ...).
    """

    def __init__(self, model: Optional[str] = None, overrides: Sequence[str] = (),
                 config: Optional[Config] = None):
        if config is None:
            ov = list(overrides)
            path = Path(model).expanduser() if model else None
            is_path = path is not None and (path.is_dir() or is_gguf(path))  # a checkpoint dir or GGUF file
            if model and not is_path:
                known = sorted(f.stem for f in (CONF_DIR / "model").glob("*.yaml"))
                if model not in known:
                    raise ValueError(f"LLM(model={model!r}): no such checkpoint directory or .gguf file, and not a "
                                     f"model name; pass a Hugging Face checkpoint directory, a GGUF file, or one of "
                                     f"{', '.join(known)}")
                ov = [f"model={model}"] + ov
            config = compose(ov)
            if is_path:  # set after composing: a path is no override syntax
                given = {o.lstrip("+~").split("=", 1)[0] for o in ov}  # (commas, quotes, '=' in it)
                name = path.resolve().stem if is_gguf(path) else path.resolve().name
                config.model.path = config.model.path if "model.path" in given else str(path.resolve())
                config.model.name = config.model.name if "model.name" in given else name
        # under torchrun: this process runs one pipeline stage (graphgen/distributed.py)
        self.cfg = config = distributed.setup(check_config(config))
        self.checkpoint, self.source, self.notice = resolve_weights(config)
        m = config.model
        if self.checkpoint is not None and is_gguf(self.checkpoint):  # architecture, weights: one file
            self.spec, self.source, self.notice = load_gguf(self.checkpoint, model_name(config, self.checkpoint),
                                                            m.keep_quantized)
        else:
            self.spec = spec_for(config, self.checkpoint)
        if self.notice:
            print(self.notice, file=sys.stderr)
        # policy=auto: choose the policy for config.workload and the budgets (printed)
        self.cfg = config = resolve_policy(config, spec=self.spec)
        self.tokenizer = load_tokenizer(self.checkpoint)
        self.executor = None
        self._graphs: Dict[Tuple[int, ...], object] = {}
        self.session = None  # the open ChatSession, which owns the executor's KV cache
        self.last_stats: Dict = {}

    # --- compile ------------------------------------------------------------------
    def compile(self, prompt_len: int, gen_len: int, batch: int, num_batches: int, past_len: int = 0,
                cache_len: int = 0, score: bool = False):
        """Graph -> passes, cached per shape. Refuses plans over budget before running."""
        key = (prompt_len, gen_len, batch, num_batches, past_len, cache_len, score)
        if key not in self._graphs:
            while len(self._graphs) >= GRAPH_CACHE:  # graphs of big jobs are large: keep a few
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = compile(self.spec, self.cfg, BlockShape(*key))
        self._graphs[key] = self._graphs.pop(key)  # most recently used last
        return self._graphs[key]

    @property
    def graph(self):
        """The last compiled graph (None before the first compile or generate)."""
        return next(reversed(self._graphs.values()), None)

    def _executor(self):
        if self.executor is None:
            self.executor = make_executor(self.spec, self.source, self.cfg)
        return self.executor

    # --- generate -------------------------------------------------------------------
    def generate(self, inputs: Union[torch.Tensor, List[str]], attention_mask: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: Union[int, Sequence[int], None] = None, return_logprobs: bool = False):
        """input_ids [B, S] (left-padded) -> [B, S + max_new_tokens]; a list of strings -> completions;
        a conversation ([{"role": "user", "content": ...}]) or a list of them -> replies, with the
        tokenizer's chat template applied and each reply cut at its end-of-turn token.

        seed: one int for the call, or one per prompt (a prompt's samples then do not depend on
        which block it lands in). return_logprobs: also return log p(token) [B, max_new_tokens]
        (0 after eos), from the distribution each token was drawn from.
        """
        if isinstance(inputs, (list, tuple)):
            prompts = [inputs] if is_messages(inputs) else list(inputs)  # one conversation, or a list
            return self._generate_text(prompts, max_new_tokens, do_sample, temperature, top_k, top_p, seed)
        row_seeds = None
        if seed is not None and not isinstance(seed, int):
            row_seeds, seed = torch.as_tensor(list(seed), dtype=torch.long), None
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        ids, mask = check_generate_args(inputs, attention_mask, max_new_tokens, self.spec.vocab_size,
                                        self.spec.max_positions)
        if row_seeds is not None and len(row_seeds) != len(ids):
            raise ValueError(f"seed has {len(row_seeds)} values for {len(ids)} prompts: give one per prompt")
        new, logprobs, _ = self._generate_ids(ids, mask, max_new_tokens, sampling, row_seeds, return_logprobs)
        out = torch.cat([inputs.long().cpu(), self._after_eos(new)], 1)  # the prompts as given
        if return_logprobs:
            return out, logprobs.masked_fill(self._after_eos_mask(new), 0.0)
        return out

    def _generate_ids(self, ids, mask, gen_len: int, sampling: Sampling, row_seeds=None, logprobs=False,
                      targets: Optional[torch.Tensor] = None):
        """Block by block through the compiled graph -> (new tokens [B, gen_len], their log p or None,
        scores or None). targets [B, S] (next token per position, -1: none): also score the prompts
        (graphgen.scoring), returning (log p(target) [B, S], target is greedy [B, S])."""
        if self.session is not None:
            raise RuntimeError("a chat session is open on this LLM: close it before calling generate")
        B, S = ids.shape
        p = self.cfg.policy
        gbs = min(p.gpu_batch_size, B)
        nb = min(p.num_gpu_batches, math.ceil(B / gbs))
        graph = self.compile(S, gen_len, gbs, nb, score=targets is not None)
        block = gbs * nb
        n_blocks = math.ceil(B / block)
        pad = n_blocks * block - B  # the last block is filled with copies of the last prompt
        ids_p = torch.cat([ids, ids[-1:].expand(pad, S)]) if pad else ids
        mask_p = torch.cat([mask, mask[-1:].expand(pad, S)]) if pad else mask
        seeds_p = torch.cat([row_seeds, row_seeds[-1:].expand(pad)]) if row_seeds is not None and pad else row_seeds
        tg_p = torch.cat([targets, targets[-1:].expand(pad, S)]) if targets is not None and pad else targets
        ex = self._executor()
        outs, lps, stats, scores = [], [], [], []
        n_ev = len(ex.trace.events) if ex.trace is not None else 0
        squares = graph.graph["num_layers"] * gen_len * nb
        bar = Progress(n_blocks, block * gen_len, squares, self.cfg.report.progress)
        ex.on_compute = bar
        t0 = time.perf_counter()
        try:
            for b in range(n_blocks):
                bar.start_block(b)
                sl = slice(b * block, (b + 1) * block)
                rs = seeds_p[sl].reshape(nb, gbs) if seeds_p is not None else None
                tg = tg_p[sl].reshape(nb, gbs, S) if tg_p is not None else None
                inp = BlockInputs(ids_p[sl].reshape(nb, gbs, S), mask_p[sl].reshape(nb, gbs, S), sampling, b,
                                  rs, logprobs, tg)
                outs.append(ex.run_block(graph, inp).reshape(block, gen_len))
                if logprobs:
                    lps.append(ex.logprobs.reshape(block, gen_len))
                if tg is not None:
                    scores.append([x.reshape(block, S) for x in ex.scores])
                stats.append(ex.stats)
        finally:
            ex.on_compute = None
            bar.close()
        self.last_stats = summarize(graph, stats, B, S, gen_len, time.perf_counter() - t0, self)
        if ex.trace is not None:  # this call's events: overlap, per-link busy time and GB/s
            self.last_stats.update(trace_metrics(ex.trace.events[n_ev:], graph))
        sc = tuple(torch.cat([s[m] for s in scores])[:B] for m in (0, 1)) if scores else None
        return torch.cat(outs)[:B], (torch.cat(lps)[:B] if logprobs else None), sc

    def _after_eos_mask(self, new: torch.Tensor) -> torch.Tensor:
        """True strictly after each row's first eos."""
        eos = self.spec.eos_token_id
        if eos is None:
            return torch.zeros_like(new, dtype=torch.bool)
        hit = (new == eos).long()
        return hit.cumsum(1) - hit > 0

    def _after_eos(self, new: torch.Tensor) -> torch.Tensor:
        """HF semantics: after a sequence's eos, every further token is the pad id."""
        eos = self.spec.eos_token_id
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else eos
        return new.masked_fill(self._after_eos_mask(new), pad) if eos is not None else new

    def _generate_text(self, prompts: List, max_new_tokens: int, *sampling) -> List[str]:
        """Strings and conversations (lists of {role, content}: the chat template applies) ->
        completions, each cut at its end of turn (eos)."""
        if self.tokenizer is None:
            raise ValueError("generate(list of strings or messages) needs a tokenizer: this model has no "
                             "checkpoint tokenizer (dummy weights?); pass token ids instead")
        if not prompts or not all((isinstance(p, str) and p) or is_messages(p) for p in prompts):
            raise ValueError("generate(list) needs at least one prompt, each a non-empty string or a "
                             "conversation (a list of {role, content} messages)")
        errors = [check_messages(p) for p in prompts if is_messages(p)]
        if any(errors):
            raise ValueError(f"generate(conversations): {next(e for e in errors if e)}")
        tok = self.tokenizer
        rows = [chat_ids(tok, p) if is_messages(p) else list(tok(p)["input_ids"]) for p in prompts]
        enc = tok.pad({"input_ids": rows}, return_tensors="pt")  # left padding (load_tokenizer)
        out = self.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens, *sampling)
        new, eot = out[:, enc["input_ids"].shape[1]:], end_of_turn_ids(tok, self.spec.eos_token_id)
        return [finish(tok, r, new[b].tolist(), eos_token_id=eot).text for b, r in enumerate(rows)]

    # --- score ----------------------------------------------------------------------
    def score(self, contexts: Sequence[str], continuations: Sequence[str]) -> List[Tuple[float, bool]]:
        """Per pair: (sum of log p(continuation | context), is the continuation greedy decoding's).
        Tokenised as lm-evaluation-harness does; prefill-only blocks through the compiled graph."""
        return scoring.score(self, contexts, continuations)

    def score_tokens(self, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]],
                     max_len: Optional[int] = None) -> List[Tuple[float, bool]]:
        """score() on token ids: (context ids, continuation ids) pairs; the last max_len tokens are fed."""
        return scoring.score_tokens(self, pairs, max_len)

    def score_rolling(self, texts: Sequence[str], max_len: Optional[int] = None) -> List[float]:
        """Log-likelihood of whole texts, longer than the context too: lm-eval's disjoint rolling windows
        of max_len tokens (default: the model's context), each token scored once."""
        return scoring.score_rolling(self, texts, max_len)

    def chat(self, max_context: Optional[int] = None):
        """A conversation that keeps its KV cache between turns (see graphgen.session)."""
        return ChatSession(self, max_context)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        if self.executor is not None:
            self.executor.close()
            self.executor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resolve_weights(cfg: Config) -> Tuple[Optional[Path], WeightSource, str]:
    """(checkpoint dir / GGUF file or None, weight source (None for a GGUF), notice to print)."""
    m = cfg.model
    if m.weights not in ("auto", "hf", "dummy"):
        raise ValueError(f"model.weights={m.weights!r}: use auto, hf or dummy")
    if m.weights == "dummy":
        return None, DummyWeights(cfg.seed), (
            f"graphgen: {m.name} with DUMMY (random) weights (model.weights=dummy); for real ones: "
            f"`hf download {m.hf_id} --local-dir DIR`, then model.path=DIR")
    ckpt = checkpoint_of(cfg)
    if ckpt is not None and is_gguf(ckpt):
        return ckpt, None, ""  # opened with its architecture (models.gguf.load)
    if ckpt is not None:
        return ckpt, CheckpointWeights(ckpt), ""
    return None, DummyWeights(cfg.seed), (
        f"graphgen: NOTE running {m.name} with DUMMY (random) weights: {describe_missing(m.hf_id, m.path)} "
        f"(set model.weights=hf to make a missing checkpoint an error)")


def load_tokenizer(ckpt: Optional[Path]):
    if ckpt is not None and is_gguf(ckpt):
        tok = gguf_tokenizer(ckpt)
    elif ckpt is None or not any((ckpt / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                             "vocab.json", "tokenizer.model")):
        return None
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt))
    if tok is None:
        return None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def summarize(graph, block_stats: List[Dict], n_seqs: int, S: int, gen: int, wall: float, llm) -> Dict:
    """FlexGen's metrics: generated tokens / (prefill + decode time), plus both phases."""
    prefill = sum(s["time"]["prefill"] for s in block_stats)
    decode = sum(s["time"]["decode"] for s in block_stats)
    moved: Dict[str, int] = {}
    for s in block_stats:
        for link, n in s["bytes"].items():
            moved[link] = moved.get(link, 0) + n
    measured = {t: max(s["peak_bytes"][t] for s in block_stats) for t in block_stats[0]["peak_bytes"]}
    sh = graph.graph["shape"]
    return {
        "model": llm.spec.name, "weights": llm.source.kind, "schedule": graph.graph["schedule"],
        "checkpoint": str(llm.checkpoint) if llm.checkpoint else None,
        "executor": llm.cfg.executor.name, "num_prompts": n_seqs, "prompt_len": S, "gen_len": gen,
        "gpu_batch_size": sh.batch, "num_gpu_batches": graph.graph["num_batches"],
        "effective_batch": sh.batch * graph.graph["num_batches"],
        "prefill_s": prefill, "decode_s": decode, "wall_s": wall,
        "prefill_tok_s": n_seqs * S / prefill if prefill else 0.0,
        "decode_tok_s": n_seqs * (gen - 1) / decode if decode and gen > 1 else 0.0,
        "total_tok_s": n_seqs * gen / (prefill + decode) if prefill + decode else 0.0,
        "planned_peak_bytes": dict(graph.graph["peak_bytes"]), "measured_peak_bytes": measured,
        "budget_bytes": dict(graph.graph["budgets"]), "bytes_moved": moved,
        "compression": graph.graph.get("compression", {}),
        **measured_memory(block_stats, llm.cfg.hardware.device), **stage_figures(block_stats),
    }


def stage_figures(block_stats: List[Dict]) -> Dict:
    """A pipeline stage's figures (executors/pipeline.py) over this call's blocks: times and bytes
    summed, the plan's peaks and budgets as they are (the same for every block)."""
    per = [s["stage"] for s in block_stats if "stage" in s]
    if not per:
        return {}
    busy: Dict[str, float] = {}
    sent: Dict[str, int] = {}
    for s in per:
        for k, v in s["busy_s"].items():
            busy[k] = busy.get(k, 0.0) + v
        for k, v in s["sent_bytes"].items():
            sent[k] = sent.get(k, 0) + v
    return {"stage": dict(per[-1], blocks=sum(s.get("blocks", 1) for s in per), wall_s=sum(s["wall_s"] for s in per),
                          busy_s=busy, sent_bytes=sent)}


def measured_memory(block_stats: List[Dict], device: str) -> Dict:
    """Process RSS / CUDA allocator peaks over the blocks, with what the plan does not count."""
    ms = [s["measured"] for s in block_stats if "measured" in s]
    if not ms:
        return {}
    return {"device_type": device.split(":")[0], "rss_start_bytes": ms[0]["rss_start"],
            "rss_peak_bytes": max(m["rss_peak"] for m in ms), "cuda_peak_bytes": max(m["cuda_peak"] for m in ms),
            "overhead_bytes": max(m["overhead"] for m in ms)}
