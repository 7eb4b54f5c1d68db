"""Tokenizer: ids, decoding and chat templates against transformers; incremental detokenization.

References: transformers' tokenizer built from the same GGUF (``AutoTokenizer.from_pretrained(dir,
gguf_file=...)``) and from the same HF directory, and ``apply_chat_template(tokenize=False)``.
Everything is compared for exact equality.
"""
from __future__ import annotations

import json

import pytest

import ckpt_reference as R
from scaleswap.runtime.checkpoint import load_checkpoint
from scaleswap.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "The capital of France is",
    "  leading spaces and trailing   ",
    "digits 1234567890, 3.14159, 1e-5, 2026-12-01 and x42y",
    "unicode: héllo wörld naïve café 日本語のテキスト 🤖👍🏽 Ελληνικά русский عربى",
    "def f(x):\n\treturn x**2  # comment\n\n\n    if a != b:\n        pass\r\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y<repo_name>z <file_sep>",
    "it's they're we'll I'd YOU'RE",
    "",
    "   ",
    "\n\n\n \t ",
    "a" * 300,
    "emoji-only 🧑‍🚀🏳️‍🌈",
    "{\"json\": [1, 2, {\"k\": null}], 'quote': \"\\u00e9\"}",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 日本."},
    ],
]


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.from_checkpoint(R.our_default_checkpoint())


@pytest.fixture(scope="session")
def hf_tok():
    return R.hf_default_tokenizer()


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers_gguf_tokenizer(tok, hf_tok, add_special_tokens):
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=add_special_tokens) == hf_tok.encode(
            text, add_special_tokens=add_special_tokens
        ), text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_transformers(tok, hf_tok, skip_special_tokens):
    for text in TEXTS:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=skip_special_tokens) == hf_tok.decode(
            ids, skip_special_tokens=skip_special_tokens
        )
    assert tok.decode(tok.encode(TEXTS[4])) == TEXTS[4]


def test_special_tokens(tok):
    assert tok.encode("no bos here") == tok.encode("no bos here", add_special_tokens=False)  # SmolLM2 adds none
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.eos_token_ids == [2]  # <|im_end|>: config EOS, tokenizer EOS and the template's end of turn
    assert tok.vocab_size == 49152
    assert tok.encode("<|im_end|>") == [2]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, add_generation_prompt):
    for messages in CONVERSATIONS:
        ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs


# A template using what real ones use: namespace, loop controls, tojson, raise_exception, tools, bos_token,
# strftime_now (checked for its presence only, the date differs between runs), whitespace control.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(sys='') -%}
{%- if messages[0]['role'] == 'system' %}{% set ns.sys = messages[0]['content'] %}{% endif -%}
{% if tools %}
<tools>{{ tools | tojson }}</tools>
{% endif %}
{%- for m in messages %}
  {%- if m['role'] == 'system' %}{% continue %}{% endif %}
  {%- if m['role'] not in ['user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}
  {% if loop.index0 > 20 %}{% break %}{% endif %}
<|im_start|>{{ m['role'] }}
{{ m['content'] | trim }}{{ eos_token }}
{% endfor %}
{%- if ns.sys %}[sys:{{ ns.sys }}]{% endif %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für <city> & \"Ort\"",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def rich_dir(tmp_path_factory):
    """An HF directory (tiny model) with RICH_TEMPLATE and a tokenizer.json that adds BOS."""
    path = tmp_path_factory.mktemp("rich")
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = RICH_TEMPLATE
    cfg["add_bos_token"] = True
    R.write_json(path / "tokenizer_config.json", cfg)
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["post_processor"] = {  # BOS as Llama 3's tokenizer.json adds it
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    R.write_json(path / "tokenizer.json", tj)
    return path


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_rich_template_matches_transformers(rich_dir, tools):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(rich_dir)
    theirs = AutoTokenizer.from_pretrained(str(rich_dir))
    for messages in CONVERSATIONS:
        got = ours.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=tools)
        assert got == want
    assert "Wetter für <city> & \\\"Ort\\\"" in ours.apply_chat_template(CONVERSATIONS[0], tools=TOOLS)  # no HTML escaping
    with pytest.raises(ValueError, match="chat template error: bad role developer"):
        ours.apply_chat_template([{"role": "developer", "content": "x"}])


def test_bos_from_tokenizer_json_post_processor(rich_dir):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(rich_dir)
    theirs = AutoTokenizer.from_pretrained(str(rich_dir))
    for text in TEXTS[:6]:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.encode("hi")[0] == ours.bos_token_id == 1


def test_gguf_add_bos_and_pre_tokenizers_match_transformers(tmp_path):
    """Tiny GGUF vocabularies (with digit merges) with add_bos_token and each pre-tokenizer family.

    For "smollm" llama.cpp splits every digit first (``\\p{N}``, then GPT-2's regex), as SmolLM2's own
    tokenizer.json does (``Digits(individual_digits=True)`` + ``ByteLevel``); transformers' GGUF conversion
    uses GPT-2's split alone there, so its pre-tokenizer is set to the llama.cpp one for the comparison.
    (SmolLM2's real vocabulary has no merges with digits, so both agree on it: see the first test.)
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    vocab = len(R.tiny_tokenizer_metadata()[0])
    model = R.tiny_hf_model("llama", vocab_size=vocab)
    for pre in ("llama-bpe", "qwen2", "smollm", "gpt2"):
        path = R.write_tiny_gguf(tmp_path / f"{pre}.gguf", model, pre=pre, add_bos=True)
        ours = Tokenizer.from_checkpoint(load_checkpoint(path))
        theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
        if pre == "smollm":
            theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
            )
            assert ours.encode(" 12") == [1, 223, 19, 20]  # "Ġ", "1", "2": the merges "Ġ 1", "1 2" never apply
        for text in TEXTS:
            assert ours.encode(text) == theirs.encode(text), (pre, text)
        assert ours.encode("x")[0] == 1


def test_save_and_reload(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.apply_chat_template(CONVERSATIONS[1]) == tok.apply_chat_template(CONVERSATIONS[1])
    assert again.eos_token_ids == tok.eos_token_ids


def test_text_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "messages,match",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"role": "wizard", "content": "x"}], r"role must be one of system, developer, user, assistant, tool"),
        ([{"content": "x"}], "role must be one of"),
        ([{"role": "user"}], r"messages\[0\].content is required"),
        ([{"role": "user", "content": 5}], "must be a string or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"content\[0\] must be a text part"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_no_template(tmp_path):
    R.save_tiny_hf_dir(R.tiny_hf_model("llama"), tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    R.write_json(tmp_path / "tokenizer_config.json", cfg)
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize("text", [TEXTS[4], TEXTS[5], TEXTS[13], "plain ascii text, nothing fancy", "é" * 7 + "🤖" * 3])
@pytest.mark.parametrize("prompt", ["", "Say: "])
def test_incremental_detokenizer(tok, text, prompt):
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)  # never half a UTF-8 character
    assert "".join(deltas) == detok.text == tok.decode(ids)
    # some byte-level tokens are partial characters here, so some deltas must have been held back
    if any(ord(ch) > 0x7FF for ch in text):
        assert "" in deltas[:-1]


def test_incremental_detokenizer_special_tokens(tok):
    ids = tok.encode("Hi<|im_end|>\nthere")
    detok = IncrementalDetokenizer(tok, [])
    assert "".join(detok.add(i) for i in ids) + detok.flush() == tok.decode(ids) == "Hi\nthere"
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert "".join(detok.add(i) for i in ids) + detok.flush() == "Hi<|im_end|>\nthere"


def test_incremental_detokenizer_flushes_an_unfinished_character(tok):
    ids = tok.encode("ok 🤖")
    detok = IncrementalDetokenizer(tok, [])
    out = "".join(detok.add(i) for i in ids[:-1])  # the emoji's last byte never comes
    assert "\ufffd" not in out and out.startswith("ok")
    assert detok.flush().endswith("\ufffd")


@pytest.mark.parametrize("add_bos", [None, False])
def test_gguf_sentencepiece_matches_transformers(tmp_path, add_bos):
    """A SentencePiece (Llama 2 / Mistral style) GGUF vocabulary: byte fallback, merges from scores, BOS default on."""
    from transformers import AutoTokenizer

    vocab = len(R.tiny_spm_metadata()[0])
    path = R.write_tiny_gguf(tmp_path / "spm.gguf", R.tiny_hf_model("llama", vocab_size=vocab), tokenizer="llama",
                             add_bos=add_bos)
    ours = Tokenizer.from_checkpoint(load_checkpoint(path))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = TEXTS + ["the cat is in the hat", " the", "[INST] hi <|im_start|> <s>x</s> <unk>"]
    for text in texts:
        for add_special_tokens in (True, False):
            assert ours.encode(text, add_special_tokens) == theirs.encode(text, add_special_tokens=add_special_tokens)
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert (ours.encode("the cat")[0] == 1) == (add_bos is None)  # llama.cpp's default for SentencePiece: BOS

    # streaming keeps the space SentencePiece's decoder strips from a sequence start
    prompt, gen = ours.encode("the cat"), ours.encode(" is in the hé", add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, prompt)
    streamed = "".join(detok.add(i) for i in gen) + detok.flush()
    assert streamed == ours.decode(prompt + gen)[len(ours.decode(prompt)):] == " is in the hé"
