"""Interactive chat (FlexGen's chatbot) that keeps the conversation's KV cache between turns.

    python -m graphgen.apps.chat                          # the default model (SmolLM2-135M-Instruct)
    python -m graphgen.apps.chat --model /path/to/checkpoint-or.gguf [overrides ...]
    echo "Hello" | python -m graphgen.apps.chat --model DIR model.dtype=float32

Each line you type is one turn: only its tokens are prefilled, against the cache of the
turns before (FlexGen re-encoded the whole history each turn). With a tokenizer that has a
chat template, turns are written by the template and a reply ends at its end-of-turn token;
without one, as "Human: ...\nAssistant:" and a reply ends at a newline. `/reset` starts over,
`/quit` or end of input leaves. Trailing words are Hydra overrides for the LLM config.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

from graphgen.api import LLM
from graphgen.chat_template import chat_ids, end_of_turn_ids, render
from graphgen.sampling import Sampling
from graphgen.session import ContextFull
from graphgen.stopping import finish

SYSTEM = ("A chat between a curious human and a knowledgeable assistant.\n"
          "Human: Hello! What can you do?\nAssistant: I can answer questions and help with writing.\n")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m graphgen.apps.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="config name, checkpoint directory or .gguf file "
                   "(default: the default model of conf/config.yaml)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system message (chat template) or opening text "
                   "(default: the template's own, or a short Human/Assistant exchange)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache positions (default: the model's)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. policy=host-offload")
    return p.parse_args(argv)


class Chat:
    """Turns over one ChatSession: written by the tokenizer's chat template when it has one
    (replies stop at the end-of-turn token), else as 'Human: ...\\nAssistant:' (replies stop at a newline)."""

    def __init__(self, llm: Any, args: argparse.Namespace):
        self.llm, self.args, self.tok = llm, args, llm.tokenizer
        self.templated = getattr(self.tok, "chat_template", None) is not None
        self.system = args.system if args.system is not None else ("" if self.templated else SYSTEM)
        self.cached = ""  # templated: the text the session's cache holds (and its pending token)
        self.session = None
        self.turn = 0
        self.turns: List[Tuple[str, str]] = []  # (human, assistant) texts since the last reset
        self.notice: Optional[str] = None  # what the last reply had to give up (printed by main)

    def reset(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.llm.chat(self.args.max_context)
        self.turn, self.turns, self.cached = 0, [], ""

    def reply(self, text: str) -> str:
        """The assistant's answer; when the conversation outgrows the cache, the oldest turns are
        dropped (self.notice says so), and a turn too long on its own raises ContextFull."""
        if self.session is None:
            self.reset()
        self.notice = None
        ids = self._turn_ids(text) if self.templated else self._plain_ids(text)
        try:
            answer = self._send(ids)
        except ContextFull:
            answer = self._send(self._restart(text))
        # templated: the reply as generated, so the next rendering extends the cache's text
        self.turns.append((text, answer if self.templated else answer.strip()))
        return answer.strip()

    def _plain_ids(self, text: str) -> List[int]:
        prompt = (self.system if self.turn == 0 else "") + f"Human: {text}\nAssistant:"
        return self.tok(prompt, add_special_tokens=self.turn == 0)["input_ids"]

    def _messages(self, turns: List[Tuple[str, str]], text: str) -> List[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        past = [{"role": r, "content": c} for h, a in turns for r, c in (("user", h), ("assistant", a))]
        return sys_msg + past + [{"role": "user", "content": text}]

    def _turn_ids(self, text: str) -> List[int]:
        """The templated conversation's tokens past what the session's cache already holds."""
        full = render(self.tok, self._messages(self.turns, text))
        if not full.startswith(self.cached):  # the template rewrote history: start the cache over
            self.session.close()
            self.session, self.cached = self.llm.chat(self.args.max_context), ""
        return list(self.tok(full[len(self.cached):], add_special_tokens=False)["input_ids"])

    def _prompt_ids(self, turns: List[Tuple[str, str]], text: str) -> List[int]:
        """The whole conversation (these turns, then text) as a fresh session's prompt."""
        if self.templated:
            return chat_ids(self.tok, self._messages(turns, text))
        history = "".join(f"Human: {h}\nAssistant: {r}\n" for h, r in turns)
        return self.tok(self.system + history + f"Human: {text}\nAssistant:")["input_ids"]

    def _restart(self, text: str) -> List[int]:
        """A new session opened with as many of the latest turns as leave room for this one."""
        turns, room = self.turns, self.session.cache_len - self.args.max_new_tokens
        for keep in range(len(turns), -1, -1):
            ids = self._prompt_ids(turns[len(turns) - keep:], text)
            if len(ids) <= room:
                break
        else:
            raise ContextFull(f"this turn needs {len(ids)} tokens (with the opening text) + {self.args.max_new_tokens} "
                              f"new ones, more than the context of {self.session.cache_len}: shorten it "
                              "(or raise --max-context, lower --max-new-tokens)")
        dropped, kept = len(turns) - keep, turns[len(turns) - keep:]
        self.reset()
        self.turns, self.turn = kept, 1
        self.notice = (f"context full: dropped the {dropped} oldest turn(s), kept the last {keep}"
                       if dropped else "context full: started over with the whole conversation re-encoded")
        return ids

    def _send(self, ids: List[int]) -> str:
        a = self.args
        sampling = Sampling(a.temperature > 0, a.temperature if a.temperature > 0 else 1.0, 0, a.top_p,
                            a.seed + self.turn)
        done: List = []

        eos, stop = ((end_of_turn_ids(self.tok, self.llm.spec.eos_token_id), None) if self.templated
                     else (self.llm.spec.eos_token_id, ["\n"]))

        def cut(tokens: List[int]) -> int:  # keep the reply up to its end (end of turn, newline) in the cache
            c = finish(self.tok, ids, tokens, eos_token_id=eos, stop=stop)
            done.append(c)
            return max(1, len(c.token_ids))

        kept = self.session.send(ids, a.max_new_tokens, sampling, cut)
        self.turn += 1
        if self.templated:
            self.cached += self.tok.decode(list(ids) + kept)
        return done[0].text

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def main(argv: Optional[Sequence[str]] = None, llm: Any = None, stdin=None, stdout=None) -> int:
    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if llm is None:
        try:
            llm = LLM(args.model, overrides=list(args.overrides))
        except ValueError as e:  # a --model that is neither a checkpoint nor a model name
            print(f"chat: {e}", file=sys.stderr)
            return 2
    if llm.tokenizer is None:
        print("chat needs a checkpoint with a tokenizer (dummy weights have none): "
              "pass --model /path/to/checkpoint", file=sys.stderr)
        return 2
    if hasattr(stdin, "reconfigure"):  # bytes that are not UTF-8 become U+FFFD, not a crash
        stdin.reconfigure(errors="replace")
    chat, interactive = Chat(llm, args), stdin.isatty()
    try:
        while True:
            if interactive:
                stdout.write("Human: ")
                stdout.flush()
            line = stdin.readline()
            if not line or line.strip() == "/quit":
                break
            if line.strip() == "/reset":
                chat.reset()
                continue
            if not line.strip():
                continue
            if "\ufffd" in line:
                print("[this line had bytes that are not UTF-8 text; they were replaced by \ufffd]", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                text = chat.reply(line.strip())
            except ContextFull as e:  # this turn alone is longer than the context: refused, visibly
                print(f"[turn not answered: {e}]", file=sys.stderr)
                continue
            if chat.notice:
                print(f"[{chat.notice}]", file=sys.stderr)
            stdout.write(f"Assistant: {text}\n")
            stdout.flush()
            print(f"[{time.perf_counter() - t0:.2f} s, context {chat.session.context_len} tokens]",
                  file=sys.stderr)
    finally:
        chat.close()
        llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
