"""The `scaleswap` CLI: every verb listed, and bad input gives one clear line, exit code 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "scaleswap.server.cli"]


def run_cli(*args, timeout=300):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:") or "error:" in lines[-1], r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_help_lists_every_verb():
    r = run_cli("--help")
    assert r.returncode == 0
    for verb in ("quantize", "generate", "perplexity", "serve", "finetune"):
        assert verb in r.stdout


def test_missing_checkpoint(tmp_path):
    r = run_cli("quantize", "--model", tmp_path / "nope.gguf", "--out", tmp_path / "out")
    assert_user_error(r, "not found")
    assert not (tmp_path / "out").exists()


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 100)
    r = run_cli("quantize", "--model", bad, "--out", tmp_path / "out")
    assert_user_error(r)
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 10,
                                               "n_embd": 8, "n_layer": 1, "n_head": 1}))
    r = run_cli("quantize", "--model", d, "--out", tmp_path / "out")
    assert_user_error(r, "LlamaForCausalLM")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [(["--bits", "5"], "bits"), (["--group-size", "48"], "group size")])
def test_bad_bits_or_group_size(tmp_path, args, needle):
    r = run_cli("quantize", *args, "--out", tmp_path / "out")
    assert_user_error(r, needle)
    assert not (tmp_path / "out").exists()


def test_group_size_not_dividing_the_model(tmp_path, quantized_base_dir):
    # 128 does not divide SmolLM2's hidden size 576: refused before anything is written
    r = run_cli("quantize", "--group-size", "128", "--out", tmp_path / "out")
    assert_user_error(r, "does not divide")
    assert not (tmp_path / "out").exists()


def test_perplexity_json(tmp_path, quantized_base_dir):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = run_cli("perplexity", "--model", quantized_base_dir, "--text", text, "--json", "--context", "64")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] > 100 and 1.0 < out["perplexity"] < 50.0  # repeated text is easy


def test_perplexity_with_scales_from_another_base_is_refused(tmp_path, quantized_base_dir):
    from scaleswap.runtime.scale_set import BaseInfo, load_scale_set, save_scale_set

    base = load_scale_set(quantized_base_dir / "base_scales.safetensors")
    shapes = {k: tuple(v.shape) for k, v in base.scales.items()}
    other = BaseInfo(fingerprint="0" * 64, bits=4, group_size=64, shapes=shapes)
    save_scale_set(tmp_path / "s.safetensors", {k: v.clone() for k, v in base.scales.items()}, other)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 10)
    r = run_cli("perplexity", "--model", quantized_base_dir, "--scales", tmp_path / "s.safetensors", "--text", text)
    assert_user_error(r, "base")


def test_generate_chat_answers_coherently(quantized_base_dir):
    """The default model quantized to 4-bit g64 answers a simple chat question correctly (greedy)."""
    r = run_cli("generate", "--model", quantized_base_dir, "--chat", "--max-tokens", "24",
                "What is the capital of France?")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout, r.stdout


def test_generate_refuses_a_corrupt_scale_file(tmp_path, quantized_base_dir):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    r = run_cli("generate", "--model", quantized_base_dir, "--scales", bad, "hello")
    assert_user_error(r, "safetensors")
