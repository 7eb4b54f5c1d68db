"""The tokenizer: a ``tokenizers.Tokenizer`` plus the model's ``tokenizer_config`` and chat template.

Behaves as transformers' fast tokenizer does for the same files:
- ``encode(text, add_special_tokens=True)``: special tokens in ``text`` are matched whole; BOS/EOS are
  added by tokenizer.json's post-processor (built from ``add_bos_token`` / ``add_eos_token`` only when
  it has none, as transformers 5 does; SmolLM2 adds nothing).
- ``apply_chat_template``: the Jinja template rendered like ``transformers.utils.chat_template_utils``
  (``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
  ``raise_exception``, a ``tojson`` that does not HTML-escape, ``strftime_now``; the special tokens
  ``bos_token``/``eos_token``/... as variables).
- ``IncrementalDetokenizer``: streaming text deltas that never split a UTF-8 character (the
  prefix/read-offset scheme of HF's ``TextStreamer`` and vLLM's ``detokenize_incrementally``).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from tokenizers import Tokenizer as _Backend
from tokenizers import processors

if TYPE_CHECKING:
    from .checkpoint import FloatCheckpoint

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Tokens that end a turn in the chat templates we know; one that the template writes is a stop token.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config: a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids for one model, with its chat template and stop tokens."""

    def __init__(
        self, backend: _Backend, tokenizer_config: dict[str, Any] | None = None, config_eos_ids: Iterable[int] = ()
    ) -> None:
        self.backend = backend
        self.tokenizer_config = dict(tokenizer_config or {})
        self.special_tokens = {k: _token_str(self.tokenizer_config.get(k)) for k in _SPECIAL_TOKEN_KEYS}
        self.chat_template: str | None = self.tokenizer_config.get("chat_template") or None
        self._config_eos_ids = [int(i) for i in config_eos_ids]
        # As transformers 5 does: tokenizer.json's post-processor decides BOS/EOS; the add_*_token flags of
        # tokenizer_config only apply when it has none.
        if backend.post_processor is None:
            cfg = self.tokenizer_config
            self._set_post_processor(bool(cfg.get("add_bos_token")), bool(cfg.get("add_eos_token")))

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """From ``tokenizer.json`` + ``tokenizer_config.json`` (+ chat template files, config EOS ids)."""
        from .checkpoint import read_tokenizer_files

        path = Path(path)
        tokenizer_json, tokenizer_config = read_tokenizer_files(path)
        eos_ids: list[int] = []
        for name in ("config.json", "generation_config.json"):
            if (path / name).is_file():
                eos = json.loads((path / name).read_text()).get("eos_token_id")
                eos_ids += [eos] if isinstance(eos, int) else list(eos or [])
        return cls(_Backend.from_str(tokenizer_json), tokenizer_config, eos_ids)

    @classmethod
    def from_checkpoint(cls, ckpt: "FloatCheckpoint") -> "Tokenizer":
        return cls(_Backend.from_str(ckpt.tokenizer_json), ckpt.tokenizer_config, ckpt.config.eos_token_ids)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template``) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text(self.backend.to_str(), encoding="utf-8")
        (path / "tokenizer_config.json").write_text(
            json.dumps(self.tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8"
        )

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """BOS/EOS insertion as transformers' ``TokenizersBackend.update_post_processor`` builds it."""
        bos, eos = self.special_tokens["bos_token"], self.special_tokens["eos_token"]
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = []
        if add_bos:
            special.append((bos, self._require_id(bos)))
        if add_eos:
            special.append((eos, self._require_id(eos)))
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def _require_id(self, token: str) -> int:
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise ValueError(f"special token {token!r} from tokenizer_config is not in the vocabulary")
        return idx

    # -- vocabulary -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special_id(self, key: str) -> int | None:
        tok = self.special_tokens.get(key)
        return self.backend.token_to_id(tok) if tok is not None else None

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Stop tokens: config EOS ids, the tokenizer's EOS, and end-of-turn tokens the chat template writes."""
        ids = list(self._config_eos_ids)
        if self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        for tok in _END_OF_TURN_TOKENS:
            if self.chat_template and tok in self.chat_template and (idx := self.backend.token_to_id(tok)) is not None:
                ids.append(idx)
        return sorted(set(ids))

    # -- text <-> ids -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"text to encode must be a string, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) with the model's chat template, as transformers does.

        Content may be a string or a list of OpenAI text parts (joined). Raises ``ValueError`` for
        malformed messages, a missing template, or an error the template raises itself.
        """
        import jinja2

        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        chat = validate_messages(messages)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of JSON-schema objects (dicts)")
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(template_kwargs)
        try:
            return _compile_template(self.chat_template).render(
                messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template error: {exc}") from None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages; return plain copies with ``None`` fields dropped and text parts joined."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            if not (role == "assistant" and msg.get("tool_calls")):
                raise ValueError(f"messages[{i}].content is required for role {role!r}")
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts")
        clean = {k: v for k, v in msg.items() if v is not None}
        if content is not None:
            clean["content"] = content
        out.append(clean)
    return out


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; transformers overrides it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-mask markers): renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the model's chat template does not parse: {exc}") from None


class IncrementalDetokenizer:
    """Turn generated token ids into text deltas, one token at a time.

    ``add(token_id)`` returns the new text; it returns ``""`` while the text ends in an incomplete UTF-8
    sequence (decoded as U+FFFD) and emits it once complete. ``flush()`` returns whatever is held back
    at the end. The concatenated deltas equal ``decode(prompt + generated)`` minus ``decode(prompt)``;
    decoding a few prompt tokens as left context keeps leading-space rules (SentencePiece) right.
    """

    _CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - self._CONTEXT_TOKENS, 0)
        self.read_offset = len(self.ids)
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # incomplete character (or nothing visible yet): wait for more tokens
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), emitted as is."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        delta = new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
