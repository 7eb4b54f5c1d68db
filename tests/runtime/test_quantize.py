"""RTN quantization, the quantized-base format, and QuantLinear against a pure-torch dequantized reference."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from scaleswap.kernels.packing import packed_row_bytes
from scaleswap.kernels.reference import dequantize
from scaleswap.runtime.config import QuantConfig
from scaleswap.runtime.quantize import fingerprint, load_quantized, quantize_checkpoint, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_rtn_error_is_within_half_a_step(bits, group_size):
    torch.manual_seed(bits * 100 + group_size)
    w = torch.randn(37, 192) * 0.05
    q, z, s = rtn_quantize(w, bits, group_size, mse_clip=False)
    G = 1 if group_size == -1 else 192 // group_size
    assert q.dtype == torch.uint8 and z.shape == (37, G) and s.shape == (37, G)
    assert int(q.max()) <= (1 << bits) - 1 and (s > 0).all()
    deq = s.repeat_interleave(192 // G, dim=1) * (q.float() - z.float().repeat_interleave(192 // G, dim=1))
    step = s.repeat_interleave(192 // G, dim=1)
    # plain RTN over a range that contains every value: error <= half a step (+ float slack)
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_clip_never_worse_than_plain(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[0, 0] = 0.5  # an outlier that plain min/max wastes range on
    errs = []
    for clip in (False, True):
        q, z, s = rtn_quantize(w, bits, 64, mse_clip=clip)
        deq = s.repeat_interleave(64, 1) * (q.float() - z.float().repeat_interleave(64, 1))
        errs.append(((deq - w) ** 2).sum().item())
    assert errs[1] <= errs[0] + 1e-9


def test_constant_and_zero_groups():
    w = torch.zeros(4, 64)
    w[1] = 0.25
    q, z, s = rtn_quantize(w, 4, 32)
    deq = s.repeat_interleave(32, 1) * (q.float() - z.float().repeat_interleave(32, 1))
    assert torch.allclose(deq, w, atol=1e-6) and (s > 0).all()


@pytest.fixture(scope="module")
def tiny_ckpt():
    """A tiny random Llama checkpoint in FloatCheckpoint form (same fields load_checkpoint returns)."""
    from scaleswap.runtime.checkpoint import FloatCheckpoint
    from scaleswap.runtime.config import ModelConfig
    from scaleswap.runtime.model import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=128)
    m = LlamaForCausalLM(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    tok = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {f"t{i}": i for i in range(96)}, "unk_token": "t0"},
           "pre_tokenizer": {"type": "Whitespace"}, "added_tokens": [], "normalizer": None, "post_processor": None, "decoder": None}
    return FloatCheckpoint(config=cfg, state_dict={k: v.detach().clone() for k, v in m.state_dict().items()},
                           tokenizer_json=json.dumps(tok), tokenizer_config={"eos_token": "t1"})


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, -1), (2, 64)])
def test_quantized_model_matches_dequantized_float_reference(tiny_ckpt, tmp_path, bits, group_size):
    from scaleswap.runtime.model import LlamaForCausalLM

    out = quantize_checkpoint(tiny_ckpt, QuantConfig(bits, group_size), tmp_path / "base", show_progress=False)
    qm = load_quantized(out)
    # integers stored at their true width
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")
    assert qw.shape == (64, packed_row_bytes(128, bits))
    # independent reference: a float model whose linears hold S ⊙ (Q − Z) dequantized in pure torch
    ref = LlamaForCausalLM(tiny_ckpt.config)
    sd = dict(tiny_ckpt.state_dict)
    for name, lin in qm.quant_linears().items():
        w = lin.weight
        sd[f"{name}.weight"] = dequantize(w.qweight, w.zeros, qm.base_scales[name], bits, w.in_features, group_size)
    ref.load_state_dict(sd)
    ids = torch.randint(0, 96, (2, 19))
    with torch.no_grad():
        a, b = qm.model(ids), ref(ids)
    assert (a - b).abs().max().item() < 1e-4  # fp32 both ways; only summation order differs
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["bits"] == bits and meta["group_size"] == group_size and len(meta["fingerprint"]) == 64


def test_fingerprint_depends_on_integers(tiny_ckpt, tmp_path):
    a = quantize_checkpoint(tiny_ckpt, QuantConfig(4, 32), tmp_path / "a", show_progress=False)
    b = quantize_checkpoint(tiny_ckpt, QuantConfig(4, 32), tmp_path / "b", show_progress=False)
    c = quantize_checkpoint(tiny_ckpt, QuantConfig(4, 64), tmp_path / "c", show_progress=False)
    fa, fb, fc = (json.loads((p / "quant_config.json").read_text())["fingerprint"] for p in (a, b, c))
    assert fa == fb != fc
    qw = {"x": (torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8))}
    qw2 = {"x": (torch.ones(2, 2, dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.uint8))}
    assert fingerprint(qw, 4, -1) != fingerprint(qw2, 4, -1)


def test_group_size_that_does_not_divide_writes_nothing(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="does not divide"):
        quantize_checkpoint(tiny_ckpt, QuantConfig(4, 128), tmp_path / "out", show_progress=False)  # K=64
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_default_model_4bit_is_close_to_float(quantized_model):
    """The real default model at 4-bit g64 keeps its top-1 prediction on a plain prompt."""
    ids = torch.tensor([quantized_model.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        logits = quantized_model.model(ids)[0, -1]
    assert quantized_model.tokenizer.decode([int(logits.argmax())]).strip() == "Paris"
