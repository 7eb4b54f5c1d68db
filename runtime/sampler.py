"""Token sampling for one engine step, vectorised over the batch, plus stop-string handling of output text.

Order of logit processing (vLLM's and HF's order):
1. penalties: repetition (HF/CTRL semantics, Keskar et al. 2019: over prompt + output tokens, positive logits
   divided by the penalty, negative ones multiplied), frequency and presence (OpenAI semantics, over output
   tokens: ``logit -= frequency * count + presence * (count > 0)``);
2. logprobs (if asked) = ``log_softmax`` of the penalised logits, before temperature and truncation: the
   model's distribution, as the OpenAI API reports it;
3. greedy rows (temperature < 1e-5): argmax;
4. sampled rows: ``/ temperature``, top-k, top-p (nucleus, Holtzman et al. 2020), min-p, softmax, one
   multinomial draw. A seeded request draws with its own ``torch.Generator``, so its text depends only on its
   seed and its logits, not on the batch around it; unseeded rows share the engine's generator.
"""
from __future__ import annotations

import torch

from .sequence import Sequence, TokenLogprob


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """logits (B, V) float32, row i for ``seqs[i]`` -> (token id per row, logprob record per row or None)."""
        B, V = logits.shape
        assert B == len(seqs)
        logits = logits.float()
        params = [s.params for s in seqs]
        pen_rows = [i for i, p in enumerate(params)
                    if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
        if pen_rows:
            logits = logits.clone()
            for i in pen_rows:
                self._apply_penalties(logits[i], seqs[i])

        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        tokens = torch.empty(B, dtype=torch.int64)
        if len(greedy) == B:
            tokens = logits.argmax(dim=-1)
        elif greedy:
            gi = torch.tensor(greedy)
            tokens[gi] = logits[gi].argmax(dim=-1)
        if sampled:
            si = torch.tensor(sampled)
            tokens[si] = self._sample(logits[si], [seqs[i] for i in sampled])
        token_list = tokens.tolist()

        records: list[TokenLogprob | None] = [None] * B
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if lp_rows:
            li = torch.tensor(lp_rows)
            lp = torch.log_softmax(logits[li], dim=-1)  # (R, V)
            chosen = lp.gather(1, tokens[li].unsqueeze(1)).squeeze(1).tolist()
            kmax = max(params[i].logprobs for i in lp_rows)
            top_v, top_i = (lp.topk(kmax, dim=-1) if kmax > 0 else (lp[:, :0], lp[:, :0].long()))
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for r, i in enumerate(lp_rows):
                k = params[i].logprobs
                records[i] = TokenLogprob(token_list[i], chosen[r], list(zip(top_i[r][:k], top_v[r][:k])))
        return token_list, records

    @staticmethod
    def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
        """In place on one row (V,)."""
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64)
            vals = row[ids]
            row[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.int64)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)  # (V,)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits (R, V) -> (R,) int64 token ids, drawn from the truncated tempered distribution."""
        R, V = logits.shape
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
        x = logits / temps[:, None]
        top_ks = [s.params.top_k for s in seqs]
        top_ps = [s.params.top_p for s in seqs]
        min_ps = [s.params.min_p for s in seqs]
        neg_inf = torch.finfo(x.dtype).min
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            xs, order = x.sort(dim=-1, descending=True)  # (R, V)
            remove = torch.zeros_like(xs, dtype=torch.bool)
            if any(k > 0 for k in top_ks):
                k = torch.tensor([k if k > 0 else V for k in top_ks])
                remove |= torch.arange(V)[None, :] >= k[:, None]
            if any(p < 1.0 for p in top_ps):
                probs = torch.softmax(xs.masked_fill(remove, neg_inf), dim=-1)
                cum = probs.cumsum(dim=-1)
                # drop a token when the mass before it already reaches top_p (the top token always stays)
                remove |= (cum - probs) >= torch.tensor(top_ps, dtype=x.dtype)[:, None]
            x = x.scatter(1, order, xs.masked_fill(remove, neg_inf))
        if any(m > 0.0 for m in min_ps):
            probs = torch.softmax(x, dim=-1)
            thresh = torch.tensor(min_ps, dtype=x.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
            x = x.masked_fill(probs < thresh, neg_inf)
        probs = torch.softmax(x, dim=-1)  # (R, V)
        out = torch.empty(R, dtype=torch.int64)
        shared = [r for r, s in enumerate(seqs) if s.generator is None]
        if shared:
            si = torch.tensor(shared)
            out[si] = torch.multinomial(probs[si], 1, generator=self.generator).squeeze(1)
        for r, s in enumerate(seqs):
            if s.generator is not None:
                out[r] = torch.multinomial(probs[r], 1, generator=s.generator)[0]
        return out


# -- stop strings -------------------------------------------------------------------------
def find_stop(text: str, stops: list[str], search_from: int) -> tuple[int, str] | None:
    """Earliest stop string in ``text`` that ends after ``search_from`` -> (index, stop), else None."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, search_from - longest + 1)
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string: text to hold back
    while streaming, because the next tokens may complete a stop string that must not be shown."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
