"""Interactive chat (FlexGen's chatbot) that keeps the conversation's KV cache between turns.

    python -m graphgen.apps.chat --model /path/to/checkpoint [overrides ...]
    echo "Hello" | python -m graphgen.apps.chat --model DIR model.dtype=float32

Each line you type is one turn: only its tokens are prefilled, against the cache of the
turns before (FlexGen re-encoded the whole history each turn). `/reset` starts over,
`/quit` or end of input leaves. Trailing words are Hydra overrides for the LLM config.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, List, Optional, Sequence, Tuple

from graphgen.api import LLM
from graphgen.sampling import Sampling
from graphgen.session import ContextFull
from graphgen.stopping import finish

SYSTEM = ("A chat between a curious human and a knowledgeable assistant.\n"
          "Human: Hello! What can you do?\nAssistant: I can answer questions and help with writing.\n")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m graphgen.apps.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="opt-1.3b", help="config name or checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=SYSTEM, help="text that opens the conversation")
    p.add_argument("--max-context", type=int, default=None, help="KV cache positions (default: the model's)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. policy=host-offload")
    return p.parse_args(argv)


class Chat:
    """Turns of 'Human: ...\\nAssistant:' over one ChatSession; replies stop at a newline."""

    def __init__(self, llm: Any, args: argparse.Namespace):
        self.llm, self.args, self.tok = llm, args, llm.tokenizer
        self.session = None
        self.turn = 0
        self.turns: List[Tuple[str, str]] = []  # (human, assistant) texts since the last reset
        self.notice: Optional[str] = None  # what the last reply had to give up (printed by main)

    def reset(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.llm.chat(self.args.max_context)
        self.turn = 0
        self.turns = []

    def reply(self, text: str) -> str:
        """The assistant's answer; when the conversation outgrows the cache, the oldest turns are
        dropped (self.notice says so), and a turn too long on its own raises ContextFull."""
        if self.session is None:
            self.reset()
        self.notice = None
        prompt = (self.args.system if self.turn == 0 else "") + f"Human: {text}\nAssistant:"
        ids = self.tok(prompt, add_special_tokens=self.turn == 0)["input_ids"]
        try:
            answer = self._send(ids)
        except ContextFull:
            answer = self._send(self._restart(text))
        self.turns.append((text, answer))
        return answer

    def _restart(self, text: str) -> List[int]:
        """A new session opened with as many of the latest turns as leave room for this one."""
        turns, room = self.turns, self.session.cache_len - self.args.max_new_tokens
        for keep in range(len(turns), -1, -1):
            history = "".join(f"Human: {h}\nAssistant: {r}\n" for h, r in turns[len(turns) - keep:])
            ids = self.tok(self.args.system + history + f"Human: {text}\nAssistant:")["input_ids"]
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

        def cut(tokens: List[int]) -> int:  # keep the reply up to its newline (or eos) in the cache
            c = finish(self.tok, ids, tokens, eos_token_id=self.llm.spec.eos_token_id, stop=["\n"])
            done.append(c)
            return max(1, len(c.token_ids))

        self.session.send(ids, a.max_new_tokens, sampling, cut)
        self.turn += 1
        return done[0].text.strip()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def main(argv: Optional[Sequence[str]] = None, llm: Any = None, stdin=None, stdout=None) -> int:
    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if llm is None:
        llm = LLM(args.model, overrides=list(args.overrides))
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
