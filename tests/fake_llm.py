"""Test doubles for the apps: a byte-level HF tokenizer built offline and a scripted fake LLM.

FakeLLM has the graphgen.LLM interface the apps use (generate on token tensors or
strings, tokenizer, spec) and answers from a script: prompt text -> completion text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

PAD, EOS = 0, 1


def make_tokenizer():
    """Byte-level tokenizer (one token per byte, <pad>=0, </s>=1), no network needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "</s>": EOS, "<unk>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@dataclass
class FakeSpec:
    eos_token_id: int = EOS
    pad_token_id: int = PAD
    max_positions: int = 256


class FakeLLM:
    """script: prompt -> completion text; a trailing "</s>" in it means the model emits eos there.
    Unscripted prompts get " <prompt reversed>" repeated. delay: seconds slept per generate call."""

    def __init__(self, script: Optional[Dict[str, str]] = None, delay: float = 0.0, max_positions: int = 256,
                 block_size: int = 4):
        self.tokenizer = make_tokenizer()
        self.spec = FakeSpec(max_positions=max_positions)
        self.script = dict(script or {})
        self.delay = delay
        self.block_size = block_size
        self.calls: List[dict] = []  # one per generate call: shape and settings

    def _completion_ids(self, prompt: str, n: int) -> List[int]:
        text = self.script.get(prompt, " " + prompt[::-1])
        eos = text.endswith("</s>")
        ids = self.tokenizer(text.removesuffix("</s>"))["input_ids"]
        if eos:
            ids = ids + [EOS]
        elif ids:
            ids = (ids * (n // len(ids) + 1))
        return (ids + [PAD] * n)[:n]

    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
                 top_k=0, top_p=1.0, seed=None, return_logprobs=False):
        if isinstance(input_ids, list):
            return self._generate_text(input_ids, max_new_tokens=max_new_tokens)
        B, S = input_ids.shape
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.calls.append(dict(shape=(B, S), max_new_tokens=max_new_tokens, do_sample=do_sample,
                               temperature=temperature, seed=seed, real=mask.sum(1).tolist()))
        time.sleep(self.delay)
        rows = []
        for b in range(B):
            prompt = self.tokenizer.decode(input_ids[b][mask[b].bool()].tolist())
            rows.append(self._completion_ids(prompt, max_new_tokens))
        out = torch.cat([input_ids, torch.tensor(rows, dtype=torch.long).view(B, max_new_tokens)], dim=1)
        if return_logprobs:
            lp = -0.5 * torch.arange(1, max_new_tokens + 1, dtype=torch.float32).repeat(B, 1)
            return out, lp
        return out

    def _generate_text(self, prompts: List[str], max_new_tokens: int) -> List[str]:
        outs = []
        for p in prompts:
            ids = self._completion_ids(p, max_new_tokens)
            ids = ids[: ids.index(EOS)] if EOS in ids else ids
            outs.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return outs


def make_opt_checkpoint(path, seed: int = 0, max_positions: int = 128):
    """A tiny random OPT checkpoint (safetensors + config + byte-level tokenizer) in path."""
    from transformers import OPTConfig, OPTForCausalLM

    tok = make_tokenizer()
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=max_positions, pad_token_id=PAD,
                    bos_token_id=EOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_llama_checkpoint(path, seed: int = 1, max_positions: int = 128):
    """A tiny random Llama checkpoint (grouped KV heads, untied head) with the byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


class HFLLM:
    """transformers' own generate behind the LLM interface: the oracle for the apps."""

    def __init__(self, path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        c = self.model.config
        self.spec = FakeSpec(eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                             max_positions=c.max_position_embeddings)
        self.block_size = 4

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, do_sample=False, temperature=1.0,
                 top_k=0, top_p=1.0, seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        kw = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else \
            dict(do_sample=False)
        return self.model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   min_new_tokens=0, pad_token_id=self.spec.pad_token_id, **kw)
