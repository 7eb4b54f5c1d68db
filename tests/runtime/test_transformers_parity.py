"""Our float model (runtime/model.py) against transformers on the same weights.

Weights: the default model's GGUF (transformers loads it itself with ``gguf_file=``; we load it through
``load_checkpoint``), and tiny random transformers models (Llama tied, Llama with llama3 rope scaling and
an untied head, Qwen2 with q/k/v biases, Mistral with and without a sliding window) saved with
``save_pretrained`` and read back through ``load_checkpoint``.

Checks, all fp32 on CPU:
- logits over a batch: max |ours - theirs| <= 1e-4 * max(1, max |theirs|) (fp32 reassociation noise
  measured ~1e-5 relative; a wrong rotary layout, norm or bias shows at >1e-1);
- greedy decoding of 32 tokens (EOS disabled, so all 32 are compared): transformers decodes with
  its KV cache (as ``generate(do_sample=False)``); ours must pick the same argmax after every prefix, checked in
  one causal forward pass over prompt + continuation (see ``_our_greedy_continuation``).
"""
from __future__ import annotations

import pytest
import torch

import ckpt_reference as R
from scaleswap.runtime.checkpoint import load_checkpoint

REL_TOL = 1e-4
NUM_NEW_TOKENS = 32


def _our_model(ckpt):
    from scaleswap.runtime.model import LlamaForCausalLM

    model = LlamaForCausalLM(ckpt.config)
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= ({"lm_head.weight"} if ckpt.config.tie_word_embeddings else set())
    return model.eval()


@torch.no_grad()
def _our_greedy_continuation(model, prompt: torch.Tensor, reference: list[int]) -> list[int]:
    """Our greedy tokens, checked in one forward pass over ``prompt + reference``.

    For a causal model the logits at position p depend only on tokens <= p, so our greedy decoding
    reproduces ``reference`` exactly iff our argmax after each prefix of it is its next token. The returned
    list is our argmax at each step; it equals ``reference`` iff the two greedy decodings are identical.
    """
    full = torch.cat([prompt, torch.tensor([reference])], dim=1)  # (1, P + n)
    logits = model(full)[0, prompt.shape[1] - 1 : -1]  # (n, V): predictions for each reference token
    return logits.argmax(-1).tolist()


@torch.no_grad()
def _their_greedy(hf_model, prompt: torch.Tensor, n: int) -> list[int]:
    """transformers' greedy decoding with its KV cache (what ``generate(do_sample=False)`` does, minus EOS)."""
    out = hf_model(prompt, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        # transformers >= 5.2x names the cache `cache`; older versions `past_key_values`
        past = {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}
        out = hf_model(torch.tensor([[tokens[-1]]]), use_cache=True, **past)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def _assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape and ours.dtype == torch.float32
    diff = (ours - theirs).abs().max().item()
    scale = max(1.0, theirs.abs().max().item())
    assert diff <= REL_TOL * scale, f"max |diff| {diff:.3g} > {REL_TOL} * {scale:.3g}"
    return diff


@pytest.fixture(scope="session")
def default_pair():
    ckpt = R.our_default_checkpoint()
    return _our_model(ckpt), R.hf_default_model(), R.hf_default_tokenizer()


@pytest.mark.timeout(300)
def test_default_model_logits_and_greedy(default_pair):
    ours, theirs, hf_tok = default_pair
    from scaleswap.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_checkpoint(R.our_default_checkpoint())
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    texts = [chat, "The capital of France is Paris. The capital of Italy is"]
    encoded = [tok.encode(t) for t in texts]
    assert encoded == [hf_tok.encode(t) for t in texts]
    T = min(len(e) for e in encoded)
    batch = torch.tensor([e[:T] for e in encoded])  # (2, T)
    with torch.no_grad():
        _assert_logits_close(ours(batch), theirs(batch).logits.float())

    prompt = torch.tensor([encoded[0]])
    their_tokens = _their_greedy(theirs, prompt, NUM_NEW_TOKENS)
    our_tokens = _our_greedy_continuation(ours, prompt, their_tokens)
    assert our_tokens == their_tokens, (tok.decode(our_tokens), tok.decode(their_tokens))
    assert "Paris" in tok.decode(our_tokens)


PARITY_KINDS = R.TINY_ARCHS + ("mistral-sliding-window",)


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_tiny_models_logits_and_greedy(tmp_path, kind):
    if kind == "mistral-sliding-window":
        theirs = R.tiny_hf_model("mistral")
        theirs.config.sliding_window = 8  # shorter than the prompt: the window must be applied
    else:
        theirs = R.tiny_hf_model(kind)
    R.save_tiny_hf_dir(theirs, tmp_path, max_shard_size="60KB")
    ckpt = load_checkpoint(tmp_path)
    if kind == "mistral-sliding-window":
        assert ckpt.config.sliding_window == 8
    ours = _our_model(ckpt)

    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(3, theirs.config.vocab_size, (3, 40), generator=gen)  # (B, T); T > rope's original 32
    with torch.no_grad():
        _assert_logits_close(ours(batch), theirs(batch).logits.float())
    prompt = batch[:1, :24]
    their_tokens = _their_greedy(theirs, prompt, NUM_NEW_TOKENS)
    assert _our_greedy_continuation(ours, prompt, their_tokens) == their_tokens
