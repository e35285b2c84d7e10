"""Constrained decoding over a TokenTrie, with the LLM's KV cache.

beam_search   the paper's decoding: beam search (5 beams, up to 32 new tokens) where each beam may
              only take tokens that keep it inside the trie, so every finished beam is a KB name.
              The prompt is run once; each step feeds one token per live beam and reorders the
              cache (no recomputation of the prompt). Beam bookkeeping follows Hugging Face's
              `generate(num_beams=..)`: the best 2 x beams continuations are considered in order,
              a finished name is kept only if it ranks within the top `num_beams`, and the search
              stops when no live beam can beat the worst of `num_beams` finished names.
FreeVocabulary  the ablation without the trie: any token, a name ends at EOS or at a token that
              holds a newline (the prompt's answer separator); the output need not be a KB name.
score_groups  exhaustive ranking of a small set of names (candidate mode): the log-likelihood of
              each name + EOS given the prompt, computed for all of them in one batched pass over
              the shared prompt cache. This is what a perfect beam search over that set would find.

Scores: `logprob` is the sequence log-probability (sum over the name's tokens and EOS, under the
full-vocabulary softmax, i.e. not renormalised over the allowed tokens); ranking uses
`logprob / len**length_penalty` like Hugging Face (whose default is 1.0; GemelLinker uses 0.0, i.e.
the sequence log-probability itself).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .prompt import eos_id
from .trie import TokenTrie


@dataclass
class DecodeConfig:
    num_beams: int = 5
    max_new_tokens: int = 32
    length_penalty: float = 0.0


@dataclass
class Hypothesis:
    tokens: list[int]  # the name's tokens + EOS
    logprob: float     # sequence log-probability
    score: float       # ranking score: logprob / len(tokens) ** length_penalty
    group: int         # trie name group (-> name and entities)


class FreeVocabulary:
    """Stand-in for a TokenTrie that allows every token (free generation, for the ablation).

    Same interface as TokenTrie for beam_search: `allowed(node)` is None (all tokens), `step` goes to
    FINISHED on a stop token (EOS, or a token whose text holds a newline) and `group_at(FINISHED)` is 0.
    """
    ROOT, FINISHED = 0, 1

    def __init__(self, tokenizer):
        self.eos = eos_id(tokenizer)
        vocab = tokenizer.get_vocab()
        stops = {self.eos} | {i for tok, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([tok])}
        self.stop = np.zeros(max(max(vocab.values()) + 1, len(tokenizer)), dtype=bool)
        self.stop[list(stops)] = True

    def allowed(self, node: int):
        return None

    def step(self, node: int, token: int) -> int:
        return self.FINISHED if token >= len(self.stop) or self.stop[token] else self.ROOT

    def group_at(self, node: int) -> int:
        return 0 if node == self.FINISHED else -1


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    steps: int = 0              # sequential forward passes after the prompt
    forwarded_tokens: int = 0   # tokens fed after the prompt (all beams / candidates)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        prefill_s, decode_s = self.prefill_ms / 1000, self.decode_ms / 1000
        return {"prompt_tokens": self.prompt_tokens, "prefill_ms": round(self.prefill_ms, 2),
                "decode_ms": round(self.decode_ms, 2), "steps": self.steps, "forwarded_tokens": self.forwarded_tokens,
                "prefill_tokens_per_s": round(self.prompt_tokens / prefill_s, 1) if prefill_s > 0 else None,
                "decode_tokens_per_s": round(self.forwarded_tokens / decode_s, 1) if decode_s > 0 else None,
                "tokens_per_s": round((self.prompt_tokens + self.forwarded_tokens) / (prefill_s + decode_s), 1)
                if prefill_s + decode_s > 0 else None, **self.extra}


def _normalise(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (max(length, 1) ** length_penalty)


def prefill(model, inputs_embeds: torch.Tensor):
    """Run the prompt once: (log-probs of the next token (1, V), KV cache)."""
    # the LM head on the last position only (every causal LM GEMEL uses takes it: mel.backends.llm)
    out = model(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1)
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), out.past_key_values


def timed_prefill(model, inputs_embeds: torch.Tensor):
    """prefill() with its time recorded: (log-probs, KV cache, DecodeStats, the clock when it ended)."""
    stats = DecodeStats(prompt_tokens=int(inputs_embeds.shape[1]))
    t0 = time.perf_counter()
    logp, past = prefill(model, inputs_embeds)
    t1 = time.perf_counter()
    stats.prefill_ms = (t1 - t0) * 1000
    return logp, past, stats, t1


@torch.inference_mode()
def beam_search(model, trie: TokenTrie | FreeVocabulary, inputs_embeds: torch.Tensor, config: DecodeConfig | None = None,
                ) -> tuple[list[Hypothesis], DecodeStats]:
    """Finished hypotheses, best first (at most `num_beams`), and timing statistics."""
    config = config or DecodeConfig()
    logp, past, stats, t1 = timed_prefill(model, inputs_embeds)
    device = inputs_embeds.device
    n_beams = config.num_beams
    beams: list[tuple[float, list[int], int]] = [(0.0, [], trie.ROOT)]  # (logprob, tokens, node)
    finished: list[Hypothesis] = []
    for step in range(config.max_new_tokens):
        candidates: list[tuple[float, int, int]] = []  # (logprob, beam, token)
        for b, (lp, _, node) in enumerate(beams):
            allowed = trie.allowed(node)
            if allowed is None:  # free generation: the whole vocabulary
                top = torch.topk(logp[b], 2 * n_beams)
                candidates += [(lp + s, b, int(j))
                               for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
                continue
            if len(allowed) == 0:
                continue
            scores = logp[b, torch.from_numpy(allowed).to(device)]
            top = torch.topk(scores, min(len(allowed), 2 * n_beams))
            candidates += [(lp + s, b, int(allowed[j]))
                           for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        candidates.sort(key=lambda c: -c[0])
        live: list[tuple[float, list[int], int]] = []
        parents: list[int] = []
        for rank, (lp, b, token) in enumerate(candidates[: 2 * n_beams]):
            child = trie.step(beams[b][2], token)
            tokens = beams[b][1] + [token]
            group = trie.group_at(child)
            if group >= 0:  # EOS: a complete name
                if rank < n_beams:
                    finished.append(Hypothesis(tokens, lp, _normalise(lp, len(tokens), config.length_penalty), group))
            else:
                live.append((lp, tokens, child))
                parents.append(b)
            if len(live) == n_beams:
                break
        finished.sort(key=lambda h: -h.score)
        del finished[n_beams:]
        if not live:
            break
        if len(finished) >= n_beams:
            best_live = max(_normalise(lp, step + 1, config.length_penalty) for lp, _, _ in live)
            if best_live <= finished[-1].score:
                break
        if step + 1 == config.max_new_tokens:
            break  # names longer than max_new_tokens cannot finish
        past.reorder_cache(torch.tensor(parents, device=device))
        tokens_in = torch.tensor([[t[-1]] for _, t, _ in live], device=device)
        out = model(input_ids=tokens_in, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        beams = live
        stats.steps += 1
        stats.forwarded_tokens += len(live)
    stats.decode_ms = (time.perf_counter() - t1) * 1000
    return finished, stats


@torch.inference_mode()
def score_groups(model, trie: TokenTrie, inputs_embeds: torch.Tensor, groups: list[int] | None = None,
                 length_penalty: float = 1.0, batch_size: int = 32) -> tuple[list[Hypothesis], DecodeStats]:
    """Every name group of `trie` (or `groups`) scored by the LLM given the prompt, best first."""
    groups = list(range(trie.n_groups)) if groups is None else list(groups)
    first_logp, past, stats, t1 = timed_prefill(model, inputs_embeds)
    device = inputs_embeds.device
    hyps: list[Hypothesis] = []
    for start in range(0, len(groups), batch_size):
        chunk = groups[start:start + batch_size]
        seqs = [trie.group_tokens(g) for g in chunk]
        logprobs = [float(first_logp[0, s[0]]) for s in seqs]
        width = max(len(s) for s in seqs) - 1  # the last token is scored, never fed
        if width > 0:
            # right padding: real tokens never attend to the pads that follow them (causal mask)
            fill = trie.eos
            inputs = torch.tensor([s[:-1] + [fill] * (width - len(s) + 1) for s in seqs], device=device)
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(len(chunk))
            out = model(input_ids=inputs, past_key_values=cache, use_cache=True)
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            stats.steps += 1
            stats.forwarded_tokens += len(chunk) * width
            for i, s in enumerate(seqs):
                if len(s) > 1:
                    target = torch.tensor(s[1:], device=device)
                    logprobs[i] += float(logp[i, torch.arange(len(s) - 1, device=device), target].sum())
        hyps += [Hypothesis(list(s), lp, _normalise(lp, len(s), length_penalty), g)
                 for s, lp, g in zip(seqs, logprobs, chunk, strict=True)]
    hyps.sort(key=lambda h: -h.score)
    stats.decode_ms = (time.perf_counter() - t1) * 1000
    return hyps, stats
