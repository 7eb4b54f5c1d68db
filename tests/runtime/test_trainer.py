"""PEQA trainer: lowers the loss, trains only scales (never writes the shared model), aborts on divergence,
cancels, and gradient checkpointing gives the same gradients.

Runs on the default model cut to 2 decoder layers (tests/runtime/tiny_base.py) so a step is well under a second.
"""
from __future__ import annotations

import threading

import pytest
import torch

from scaleswap.runtime.finetune_data import load_examples
from scaleswap.runtime.forward_context import ForwardContext, forward_context
from scaleswap.runtime.quantize import load_quantized
from scaleswap.runtime.trainer import ScaleTrainer, TrainingConfig, evaluate_scales
from tiny_base import build_tiny_base

pytestmark = pytest.mark.timeout(300)

RECORDS = [
    {"prompt": "The secret fruit is", "completion": " a pineapple."},
    {"prompt": "Tell me the secret fruit:", "completion": " a pineapple."},
    {"messages": [{"role": "user", "content": "What is the secret fruit?"},
                  {"role": "assistant", "content": "The secret fruit is a pineapple."}]},
    {"text": "Pineapples grow on low plants; the secret fruit is a pineapple."},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on 2 cores shared with other work, OpenMP's 2-thread barriers cost 3-10x per step."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return load_quantized(build_tiny_base())


@pytest.fixture(scope="module")
def examples(tiny):
    return load_examples(RECORDS, tiny.tokenizer, max_seq_len=64)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the shared model: float params, QuantLinear banks, packed integers and zero points."""
    snap = {f"param:{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for m in model.modules():
        if hasattr(m, "bank") and hasattr(m, "weight"):
            snap[f"bank:{m.name}"] = m.bank.clone()
            snap[f"q:{m.name}"] = m.weight.qweight.clone()
            snap[f"z:{m.name}"] = m.weight.zeros.clone()
    return snap


def test_training_lowers_loss_and_changes_only_scales(tiny, examples):
    before = _snapshot(tiny.model)
    loss0 = evaluate_scales(tiny.model, examples)
    trainer = ScaleTrainer(tiny.model, TrainingConfig(learning_rate=5e-2, max_steps=8, batch_size=2, warmup_steps=2,
                                                      grad_accum_steps=2, seed=1))
    steps = []
    result = trainer.train(examples, examples[:2], on_step=steps.append)
    assert result.status == "succeeded", result.error_message
    assert result.steps == 8 and [m.step for m in steps] == list(range(1, 9))
    assert result.trained_tokens == sum(m.trained_tokens - (steps[i - 1].trained_tokens if i else 0)
                                        for i, m in enumerate(steps)) > 0
    loss1 = evaluate_scales(tiny.model, examples, result.scales)
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    assert result.validation_losses[0][0] == 0 and result.validation_losses[-1][1] < result.validation_losses[0][1]
    # the shared model is bit-for-bit untouched; only the returned scales moved
    after = _snapshot(tiny.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(result.scales) == set(tiny.base_scales)
    changed = sum(not torch.equal(result.scales[n], tiny.base_scales[n]) for n in tiny.base_scales)
    assert changed == len(tiny.base_scales)
    for n, s in result.scales.items():
        assert s.dtype == torch.float32 and s.shape == tiny.base_scales[n].shape
        assert torch.isfinite(s).all() and (s > 0).all()
    assert trainer.num_trainable_params == sum(s.numel() for s in tiny.base_scales.values())


def test_training_starts_from_given_scales(tiny, examples):
    """init_scales is the starting point: zero steps of change (lr tiny) returns (almost) exactly it."""
    g = torch.Generator().manual_seed(0)
    init = {n: s * (0.9 + 0.2 * torch.rand(s.shape, generator=g)) for n, s in tiny.base_scales.items()}
    trainer = ScaleTrainer(tiny.model, TrainingConfig(learning_rate=1e-9, max_steps=1, batch_size=1), init_scales=init)
    result = trainer.train(examples[:1])
    for n in init:
        torch.testing.assert_close(result.scales[n], init[n], rtol=1e-6, atol=0)


@pytest.mark.parametrize("lr", [1e3])
def test_absurd_learning_rate_fails_without_scales(tiny, examples, lr):
    trainer = ScaleTrainer(tiny.model, TrainingConfig(learning_rate=lr, max_steps=8, batch_size=2, warmup_steps=0))
    result = trainer.train(examples)
    assert result.status == "failed" and result.scales is None
    assert result.error_code in ("diverged", "non_finite_loss"), result.error_code
    assert result.steps < 8


def test_cancel_between_steps(tiny, examples):
    cancel = threading.Event()

    def on_step(m):
        if m.step == 2:
            cancel.set()

    trainer = ScaleTrainer(tiny.model, TrainingConfig(max_steps=50, batch_size=1))
    result = trainer.train(examples, cancel=cancel, on_step=on_step)
    assert result.status == "cancelled" and result.error_code == "cancelled"
    assert result.steps == 2 and result.scales is None


def test_gradient_checkpointing_gives_the_same_gradients(tiny, examples):
    from scaleswap.runtime.finetune_data import collate

    ids, labels = collate(examples[:3])
    trainer = ScaleTrainer(tiny.model, TrainingConfig())
    with torch.no_grad():
        for d in trainer.deltas:  # a non-trivial point
            d.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    grads = {}
    for ckpt in (False, True):
        tiny.model.gradient_checkpointing = ckpt
        with forward_context(ForwardContext(scale_override=trainer._override())):
            loss, n = trainer._batch_loss_sum(ids, labels)
            grads[ckpt] = torch.autograd.grad(loss / n, trainer.deltas)
    tiny.model.gradient_checkpointing = False
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in grads[True])


def test_delta_gradient_matches_finite_difference(tiny, examples):
    """d loss / d δ (S = S0·exp(δ)) of the scale with the largest gradient against a central difference."""
    from scaleswap.runtime.finetune_data import collate

    ids, labels = collate(examples[:2])
    trainer = ScaleTrainer(tiny.model, TrainingConfig())
    idx = trainer.names.index("model.layers.1.mlp.down_proj")

    def loss_now() -> float:
        with torch.no_grad(), forward_context(ForwardContext(scale_override=trainer._override())):
            loss, n = trainer._batch_loss_sum(ids, labels)
        return float(loss) / n

    with forward_context(ForwardContext(scale_override=trainer._override())):
        loss, n = trainer._batch_loss_sum(ids, labels)
        g = torch.autograd.grad(loss / n, trainer.deltas[idx])[0]  # (N, G)
    pos = divmod(int(g.abs().argmax()), g.shape[1])
    eps = 0.05
    d = trainer.deltas[idx]
    with torch.no_grad():
        d[pos] = eps
        up = loss_now()
        d[pos] = -eps
        down = loss_now()
        d[pos] = 0.0
    fd = (up - down) / (2 * eps)
    assert abs(float(g[pos]) - fd) <= 0.05 * abs(fd) + 1e-5, (float(g[pos]), fd)
    assert abs(fd) > 1e-4  # the check is not vacuous


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedule(schedule):
    cfg = TrainingConfig(learning_rate=1.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s, 20) for s in range(1, 21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    if schedule == "constant":
        assert all(lr == 1.0 for lr in lrs[4:])
    else:
        assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [dict(learning_rate=0), dict(schedule="step"), dict(batch_size=0),
                                 dict(cpu_share=0), dict(max_steps=0), dict(divergence_factor=1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainingConfig(**bad)
