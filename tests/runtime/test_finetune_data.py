"""Fine-tuning data: JSONL parsing with line numbers, loss masks per record shape, windows, batches, splits.

Uses the default model's real tokenizer and chat template (SmolLM2, ChatML); the expected target text is
derived independently by rendering the template and cutting strings, not with the code under test.
"""
from __future__ import annotations

import json

import pytest
import torch

from scaleswap.runtime.finetune_data import (
    IGNORE_INDEX,
    Example,
    collate,
    iterate_batches,
    load_examples,
    parse_jsonl,
    split_validation,
)
from scaleswap.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(quantized_base_dir):
    return Tokenizer.from_dir(quantized_base_dir)


def _targets(tok, ex: Example) -> str:
    return tok.decode([i for i, m in zip(ex.input_ids, ex.target_mask) if m], skip_special_tokens=False)


def _jsonl(*records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


def test_messages_loss_only_on_assistant_turns(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    (ex,) = load_examples([{"messages": msgs}], tok, 512)
    full = tok.apply_chat_template(msgs, add_generation_prompt=False)
    # the whole conversation is there, exactly as the template renders it
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == full
    # targets: each assistant turn with its end-of-turn marker, nothing else
    expected = ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = tok.apply_chat_template(msgs[:i], add_generation_prompt=True)
            after = tok.apply_chat_template(msgs[: i + 1], add_generation_prompt=False)
            expected += after[len(before):]
    assert _targets(tok, ex) == expected
    assert "Paris." in expected and "<|im_end|>" in expected and "France" not in expected and "Be brief" not in expected


def test_trailing_user_turn_is_dropped(tok):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    (ex,) = load_examples([{"messages": msgs}], tok, 512)
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == tok.apply_chat_template(msgs[:2], add_generation_prompt=False)


def test_prompt_completion_loss_on_completion_and_eos(tok):
    (ex,) = load_examples([{"prompt": "Translate 'chat' to English:", "completion": " cat"}], tok, 512)
    prompt_ids = tok.encode("Translate 'chat' to English:")
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert not any(ex.target_mask[: len(prompt_ids)])
    assert all(ex.target_mask[len(prompt_ids):])
    assert ex.input_ids[-1] == tok.eos_token_id
    assert _targets(tok, ex) == " cat" + tok.id_to_token(tok.eos_token_id)


@pytest.mark.parametrize("max_len", [2, 7, 16, 64])
def test_raw_text_windows_predict_every_token_once(tok, max_len):
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tok.encode(text)
    exs = load_examples([{"text": text}], tok, max_len)
    assert all(2 <= len(e.input_ids) <= max_len and all(e.target_mask) for e in exs)
    assert sum(e.num_target_tokens for e in exs) == len(ids) - 1
    # consecutive windows overlap by exactly one token and rebuild the stream
    stream = exs[0].input_ids + [t for e in exs[1:] for t in e.input_ids[1:]]
    assert stream == ids


@pytest.mark.parametrize("bad, line, needle", [
    ('{"text": "ok"}\nnot json\n', 2, "not valid JSON"),
    ('{"text": "ok"}\n\n[1, 2]\n', 3, "expected a JSON object"),
    ('{"foo": 1}\n', 1, "unknown record"),
    ('{"text": "a"}\n{"prompt": "p"}\n', 2, "prompt/completion"),
    ('{"prompt": "p", "completion": ""}\n', 1, "empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', 1, "no assistant"),
    ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n', 1, "role"),
    ('{"messages": []}\n', 1, "non-empty"),
    ('{"text": ""}\n', 1, "non-empty"),
])
def test_bad_lines_name_their_line(bad, line, needle):
    with pytest.raises(ValueError, match=rf"^line {line}: .*{needle}"):
        parse_jsonl(bad)


def test_empty_file_and_bad_encoding():
    with pytest.raises(ValueError, match="no records"):
        parse_jsonl("\n\n")
    with pytest.raises(ValueError, match="UTF-8"):
        parse_jsonl(b"\xff\xfe{")


def test_prompt_longer_than_max_len_is_an_error_with_line(tok):
    data = _jsonl({"text": "a fine sentence"}, {"prompt": "word " * 100, "completion": " x"})
    with pytest.raises(ValueError, match="^line 2: no completion"):
        load_examples(data, tok, 16)


@pytest.mark.parametrize("lengths", [[3], [5, 2, 9], [4, 4, 4, 4]])
def test_collate_shifts_labels_and_pads(lengths):
    exs = [Example(list(range(10, 10 + n)), [i % 2 == 1 for i in range(n)], 1) for n in lengths]
    ids, labels = collate(exs, pad_id=0)
    T = max(lengths)
    assert ids.shape == labels.shape == (len(lengths), T) and ids.dtype == labels.dtype == torch.int64
    for b, e in enumerate(exs):
        n = len(e.input_ids)
        assert ids[b, :n].tolist() == e.input_ids and (ids[b, n:] == 0).all()
        for t in range(T):
            want = e.input_ids[t + 1] if t + 1 < n and e.target_mask[t + 1] else IGNORE_INDEX
            assert labels[b, t] == want


def test_batches_cover_each_epoch_and_are_seeded():
    exs = [Example([i, i + 1], [True, True], i) for i in range(7)]
    it1, it2 = iterate_batches(exs, 3, seed=5), iterate_batches(exs, 3, seed=5)
    epoch = [next(it1) for _ in range(3)]  # 3 + 3 + 1
    assert sorted(int(ids[b, 0]) for ids, _ in epoch for b in range(ids.shape[0])) == list(range(7))
    for (a, _), (b, _) in zip(epoch, (next(it2) for _ in range(3))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n, frac, n_val", [(10, 0.1, 1), (10, 0.25, 2), (1, 0.5, 0), (20, 0.0, 0), (3, 0.01, 1)])
def test_validation_split(n, frac, n_val):
    exs = [Example([i, i], [True, True], i) for i in range(n)]
    train, val = split_validation(exs, frac, seed=3)
    assert len(val) == n_val and len(train) + len(val) == n
    assert {e.line for e in train}.isdisjoint({e.line for e in val})
    assert [e.line for e in split_validation(exs, frac, seed=3)[1]] == [e.line for e in val]
    with pytest.raises(ValueError):
        split_validation(exs, 1.0)
