"""Chat messages -> prompt tokens with the tokenizer's chat template; the end-of-turn token ids.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. The
template (from tokenizer_config.json, or a GGUF's tokenizer.chat_template) renders it, with the
opening of the assistant's turn appended; the text is then tokenised without adding special
tokens (the template writes them), as transformers' apply_chat_template(tokenize=True) does.
A reply ends at the template's end-of-turn token: the tokenizer's eos token in chat-tuned
tokenizers (<|im_end|>, <|eot_id|>), which may differ from the model config's eos id.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

Messages = List[Dict[str, str]]
ROLES = ("system", "user", "assistant", "tool")


def is_messages(x: Any) -> bool:
    """A conversation (a list of {role, content} dicts), as opposed to a prompt string."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def check_messages(messages: Any) -> Optional[str]:
    """Why `messages` is not a conversation the template can render, or None."""
    if not isinstance(messages, list) or not messages:
        return f"messages must be a non-empty list of {{role, content}} objects, got {json.dumps(messages)[:80]}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"messages[{i}] must be an object with string role and content, got {json.dumps(m)[:80]}"
        if m["role"] not in ROLES:
            return f"messages[{i}].role={m['role']!r}: use one of {', '.join(ROLES)}"
    if not any(m["content"].strip() for m in messages):
        return "messages are all empty"
    return None


def render(tokenizer: Any, messages: Sequence[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The conversation as the template writes it (text, special tokens included)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model's tokenizer has no chat template: send a plain prompt (OpenAI batch: url "
                         "/v1/completions) instead of "
                         "messages, or use a chat-tuned checkpoint (its tokenizer_config.json or GGUF "
                         "carries the template)")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_ids(tokenizer: Any, messages: Sequence[Dict[str, str]]) -> List[int]:
    """Prompt token ids for the assistant's next turn."""
    return list(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])


def end_of_turn_ids(tokenizer: Any, eos_token_id: Optional[int]) -> List[int]:
    """Ids that end a reply: the model's eos and the tokenizer's (the template's end of turn)."""
    ids = [eos_token_id, getattr(tokenizer, "eos_token_id", None)]
    return [i for n, i in enumerate(ids) if i is not None and i not in ids[:n]]
