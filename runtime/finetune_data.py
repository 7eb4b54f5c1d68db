"""Fine-tuning data: OpenAI-style JSONL records -> token ids with a loss mask -> padded batches.

Accepted record shapes (one JSON object per line, the ones OpenAI's fine-tuning API takes):

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: rendered with the
  model's chat template; loss only on the assistant turns (their content and the end-of-turn marker
  the template appends), never on system/user text or the template's role headers.
- ``{"prompt": str, "completion": str}``: loss on the completion tokens only; the tokenizer's EOS token is
  appended to the completion (a target) so the model learns where a completion ends.
- ``{"text": str}``: raw text, every token is a target; long texts are cut into windows of
  ``max_seq_len`` tokens (no text is dropped).

Special tokens: the chat template writes its own (BOS included, where a template has one), so rendered
conversations are encoded with ``add_special_tokens=False`` (as transformers' ``apply_chat_template`` does);
raw text and prompts get the tokenizer's usual ones (SmolLM2 adds none).

Label convention (HF): ``labels[b, t]`` is the token predicted at position ``t`` (i.e. ``input_ids[b, t+1]``
of the same sequence), ``IGNORE_INDEX`` where no loss is taken (prompt tokens, padding, last position).
Padding is on the right; with plain causal attention right padding never changes the logits of real
tokens, so no attention mask is needed.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
RECORD_SHAPES = '{"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'


class TokenizerLike(Protocol):
    """What this module needs from :class:`scaleswap.runtime.tokenizer.Tokenizer`."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...


@dataclass
class Example:
    """One training sequence. ``target_mask[t]`` is True when token ``t`` is predicted (loss counted)."""

    input_ids: list[int]
    target_mask: list[bool]
    line: int  # 1-based line of the JSONL record it came from (for error messages)

    def __post_init__(self) -> None:
        assert len(self.input_ids) == len(self.target_mask)

    @property
    def num_target_tokens(self) -> int:
        # the first token is never predicted (nothing precedes it)
        return sum(self.target_mask[1:])


# --------------------------------------------------------------------------- parsing
def parse_jsonl(source: str | bytes | Path) -> list[tuple[int, dict[str, Any]]]:
    """Parse JSONL text (or a file path) into ``[(line_number, record)]``, validating each record's shape.

    Blank lines are skipped. Raises ``ValueError("line N: ...")`` on the first bad line.
    """
    if isinstance(source, Path):
        text = source.read_text(encoding="utf-8")
    elif isinstance(source, bytes):
        try:
            text = source.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"training data is not UTF-8 text: {e}") from None
    else:
        text = source
    records: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        validate_record(rec, lineno)
        records.append((lineno, rec))
    if not records:
        raise ValueError(f"training data has no records; expected JSONL lines shaped {RECORD_SHAPES}")
    return records


def validate_record(rec: Any, lineno: int) -> None:
    """Check one record is one of the accepted shapes; ``ValueError("line N: ...")`` otherwise."""
    where = f"line {lineno}"
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object shaped {RECORD_SHAPES}, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:
                raise ValueError(f"{where}: messages[{i}].role {m['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: 'messages' has no assistant message, so there is nothing to learn")
    elif "prompt" in rec or "completion" in rec:
        for key in ("prompt", "completion"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{where}: a prompt/completion record needs string 'prompt' and 'completion'")
        if not rec["completion"]:
            raise ValueError(f"{where}: 'completion' is empty, so there is nothing to learn")
    elif "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
    else:
        raise ValueError(f"{where}: unknown record with keys {sorted(rec)}; expected {RECORD_SHAPES}")


# --------------------------------------------------------------------------- tokenization
def _chat_segments(messages: list[dict[str, Any]], tokenizer: TokenizerLike, lineno: int) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_target) segments: each assistant turn is a target.

    The rendering of ``messages[:i]`` with a generation prompt must be a prefix of the rendering of
    ``messages[:i+1]`` (true for ChatML-style templates such as SmolLM2's); the difference is the
    assistant's turn including the template's end-of-turn marker.
    """
    segments: list[tuple[str, bool]] = []
    done = ""  # text already emitted
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"line {lineno}: the conversation starts with an assistant message; put a system or user message first")
        prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError(
                f"line {lineno}: the chat template does not render the conversation incrementally, "
                f"so assistant tokens cannot be located; use prompt/completion records instead"
            )
        segments.append((prefix[len(done):], False))
        segments.append((full[len(prefix):], True))
        done = full
    # messages after the last assistant turn carry no target: drop them
    return [(t, tgt) for t, tgt in segments if t]


def encode_record(rec: dict[str, Any], lineno: int, tokenizer: TokenizerLike, max_seq_len: int) -> list[Example]:
    """Tokenize one validated record into one or more :class:`Example` (raw text is windowed)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
    add_special = True
    eos_target: list[int] = []
    if "messages" in rec:
        segments = _chat_segments(rec["messages"], tokenizer, lineno)
        add_special = False
    elif "completion" in rec:
        segments = [(rec["prompt"], False), (rec["completion"], True)]
        eos = getattr(tokenizer, "eos_token_id", None)
        eos_target = [] if eos is None else [int(eos)]
    else:
        ids = tokenizer.encode(rec["text"])
        out = []
        # windows overlap by one token so every token after the first is predicted exactly once
        for start in range(0, max(len(ids) - 1, 1), max_seq_len - 1):
            window = ids[start : start + max_seq_len]
            if len(window) >= 2:
                out.append(Example(window, [True] * len(window), lineno))
        if not out:
            raise ValueError(f"line {lineno}: 'text' is a single token; need at least two to learn from")
        return out
    ids: list[int] = []
    mask: list[bool] = []
    for i, (text, is_target) in enumerate(segments):
        seg = tokenizer.encode(text, add_special_tokens=add_special and i == 0) if text else []
        ids.extend(seg)
        mask.extend([is_target] * len(seg))
    ids.extend(eos_target)
    mask.extend([True] * len(eos_target))
    ids, mask = ids[:max_seq_len], mask[:max_seq_len]  # keep the start: prompts come first
    ex = Example(ids, mask, lineno)
    if ex.num_target_tokens == 0:
        raise ValueError(
            f"line {lineno}: no completion/assistant tokens within max_seq_len={max_seq_len} "
            f"(the prompt alone is {len(ids)} tokens or more); shorten the prompt"
        )
    return [ex]


def load_examples(
    source: str | bytes | Path | Sequence[dict[str, Any]], tokenizer: TokenizerLike, max_seq_len: int
) -> list[Example]:
    """JSONL text/bytes/path, or an already-parsed list of records, -> tokenized examples."""
    if isinstance(source, (str, bytes, Path)):
        records = parse_jsonl(source)
    else:
        records = []
        for i, rec in enumerate(source, start=1):
            validate_record(rec, i)
            records.append((i, rec))
        if not records:
            raise ValueError(f"training data has no records; expected records shaped {RECORD_SHAPES}")
    examples: list[Example] = []
    for lineno, rec in records:
        examples.extend(encode_record(rec, lineno, tokenizer, max_seq_len))
    return examples


def split_validation(
    examples: Sequence[Example], fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split: ``round(fraction * n)`` examples (at least 1 when fraction > 0 and n >= 2)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    n_val = 0 if fraction == 0 or n < 2 else max(1, round(fraction * n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val = sorted(order[:n_val])
    val_set = set(val)
    return [examples[i] for i in range(n) if i not in val_set], [examples[i] for i in val]


# --------------------------------------------------------------------------- batching
def collate(examples: Sequence[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: -> input_ids (B, T) int64, labels (B, T) int64 (IGNORE_INDEX = no loss)."""
    assert examples, "collate needs at least one example"
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.int64)  # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
    for b, e in enumerate(examples):
        L = len(e.input_ids)
        ids = torch.tensor(e.input_ids, dtype=torch.int64)
        input_ids[b, :L] = ids
        tgt = torch.tensor(e.target_mask[1:], dtype=torch.bool)  # (L-1,) is token t+1 a target
        labels[b, : L - 1] = torch.where(tgt, ids[1:], torch.full_like(ids[1:], IGNORE_INDEX))
    return input_ids, labels


def iterate_batches(
    examples: Sequence[Example], batch_size: int, seed: int, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of shuffled batches; each epoch is a fresh permutation (seeded by ``seed`` and epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise ValueError("no training examples")
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield collate([examples[j] for j in order[i : i + batch_size]], pad_id)
        epoch += 1


def fixed_batches(examples: Sequence[Example], batch_size: int, pad_id: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches in order (no shuffle), sorted by length to waste little padding."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    for i in range(0, len(ordered), batch_size):
        yield collate(ordered[i : i + batch_size], pad_id)


def count_target_tokens(examples: Iterable[Example]) -> int:
    return sum(e.num_target_tokens for e in examples)
