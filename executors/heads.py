"""What the executor does with the output head's logits: sample the next tokens (greedy or seeded,
per row or per block) and, for scoring, keep only log p(target) and the greedy flag per position."""
from __future__ import annotations

import torch

from graphgen.costs import score_chunk
from graphgen.sampling import select_tokens, step_generator, token_logprobs


class Heads:
    """Mixed into Executor (executors/base.py), whose attributes it uses."""

    def score(self, w, h: torch.Tensor, targets: torch.Tensor):
        """Hidden states [B, S, H] -> (log p(target) [B, S], target is the argmax [B, S]) on the CPU, for
        the positions with a target (>= 0; others 0 / True). Logits are made a chunk of positions at a
        time (costs.score_chunk), so memory does not grow with vocabulary x length."""
        B, S = targets.shape
        lp, greedy = torch.zeros(B, S), torch.ones(B, S, dtype=torch.bool)
        cols = (targets >= 0).any(0).nonzero()
        if len(cols) == 0:
            return lp, greedy
        first = int(cols[0])
        step = score_chunk(B, self.spec.vocab_size, S - first)
        for c0 in range(first, S, step):
            t = targets[:, c0:c0 + step].to(h.device)
            logits = self.spec.head(w, h[:, c0:c0 + step]).float()  # [B, C, V] on the device
            got = logits.gather(-1, t.clamp(min=0)[..., None])[..., 0]
            lp[:, c0:c0 + step] = (got - torch.logsumexp(logits, -1)).cpu()
            greedy[:, c0:c0 + step] = ((logits.argmax(-1) == t) | (t < 0)).cpu()
        return lp.masked_fill_(targets < 0, 0.0), greedy


    def sample(self, n, logits: torch.Tensor) -> None:
        i, _, k = n
        st, s = self.state, self.state.inputs.sampling
        if not s.do_sample and not st.inputs.return_logprobs:  # greedy where the logits are: B ids cross, not B x V
            st.tokens[k].append(select_tokens(logits, s).cpu())
            return
        logits = logits.cpu()
        if st.inputs.row_seeds is not None and s.do_sample:  # each row its own stream of randomness
            seeds = st.inputs.row_seeds[k].tolist()
            toks = torch.cat([select_tokens(logits[r:r + 1], s, step_generator(seed, 0, 0, i))
                              for r, seed in enumerate(seeds)])
        else:
            toks = select_tokens(logits, s, step_generator(s.seed, st.inputs.block, k, i))
        st.tokens[k].append(toks)
        if st.inputs.return_logprobs:
            st.logprobs[k].append(token_logprobs(logits, toks, s))
