"""The CPU path of multi_tenant_linear against the float32 reference, and its gradients.

Tolerances: int4pack branch (bf16 activations, bf16 integer product and, group-wise, bf16 scales):
|y − ref| <= 2^-7 · Σ_k |x||w| elementwise (three bf16 roundings of 2^-9 each, plus slack; 4-bit
group-wise 2^-6, see kernels/cpu_path.py); float32
dense branch: max |y − ref| / max |ref| < 1e-5; gradients (float32): the same measure < 1e-4.
"""

import pytest
import torch

from scaleswap.kernels import cpu_path
from scaleswap.kernels.ops import multi_tenant_linear
from scaleswap.kernels.reference import dequantize, multi_tenant_linear_ref

from kernel_cases import make_layer, make_slots, rel_err, within_bound

SHAPES = [(67, 200), (48, 96), (16, 33)]  # (N, K): N, K not multiples of 16 / 32 / the group size


def int4_tolerance(w) -> float:
    """4-bit group-wise rounds z' = s·(8 − Z) to bf16 (cancellation, up to s/32 per weight)."""
    return 2**-6 if (w.bits == 4 and w.group_size != -1) else 2**-7


def _ref(x, w, bank, slots):
    return multi_tenant_linear_ref(x, w.qweight, w.zeros, bank, slots, w.bits, w.in_features, w.group_size, w.bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("M", [1, 5, 64])
@pytest.mark.parametrize("mixed", [False, True])
def test_cpu_matches_reference(bits, group_size, M, mixed):
    for N, K in SHAPES:
        w, bank = make_layer(N, K, bits, group_size, bias=(N == 67))
        x = torch.randn(M, K)
        slots = make_slots(M, bank.shape[0], mixed)
        y = multi_tenant_linear(x, w, bank, slots, backend="cpu")
        assert y.shape == (M, N) and y.dtype == torch.float32
        ref = _ref(x, w, bank, slots)
        tenants = 1 if slots is None else len(torch.unique(slots))
        if cpu_path.plan(w, M, tenants).startswith("int4pack"):
            assert within_bound(y, ref, x, w, bank, slots, int4_tolerance(w))
        else:
            assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("M", [1, 5, 64])
@pytest.mark.parametrize("mixed", [False, True])
def test_cpu_dense_branch_is_float32_exact(no_int4, group_size, M, mixed):
    for N, K in SHAPES:
        w, bank = make_layer(N, K, 3, group_size)
        x = torch.randn(M, K)
        slots = make_slots(M, bank.shape[0], mixed)
        y = multi_tenant_linear(x, w, bank, slots, backend="cpu")
        assert rel_err(y, _ref(x, w, bank, slots)) < 1e-5


@pytest.mark.parametrize("chunk_elements", [1 << 22, 40 * 2 * 5])
def test_many_tenants_grouped_partial_products(no_int4, monkeypatch, chunk_elements):
    # 64 rows, 64 distinct slots, small K: takes the per-group batched-GEMM branch (in 5-row chunks too)
    monkeypatch.setattr(cpu_path, "_GROUPED_CHUNK_ELEMENTS", chunk_elements)
    w, bank = make_layer(40, 64, 4, 32, num_slots=64)
    x = torch.randn(64, 64)
    slots = torch.randperm(64).to(torch.int32)
    assert cpu_path.plan(w, 64, 64) in ("native", "dense-fp32-grouped")
    monkeypatch.setattr(cpu_path, "force_plan", "dense-fp32-grouped")
    assert cpu_path.plan(w, 64, 64) == "dense-fp32-grouped"
    assert rel_err(multi_tenant_linear(x, w, bank, slots, backend="cpu"), _ref(x, w, bank, slots)) < 1e-5


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("M", [1, 5, 70])
def test_native_branch(monkeypatch, bits, group_size, M):
    from scaleswap.kernels import native

    if not native.available():
        pytest.skip("no C compiler: the native kernel is not built")
    w, bank = make_layer(37, 192, bits, group_size, bias=True)
    x = torch.randn(M, 192)
    slots = make_slots(M, bank.shape[0], True)
    monkeypatch.setattr(cpu_path, "force_plan", "native")
    y = multi_tenant_linear(x, w, bank, slots.long(), backend="cpu")  # int64 slot ids are converted
    assert rel_err(y, _ref(x, w, bank, slots)) < 1e-5


def test_plan_prefers_native_for_many_tenants():
    from scaleswap.kernels import native

    w, _ = make_layer(64, 256, 4, 64)
    expect_native = native.available()
    assert (cpu_path.plan(w, 8, 8) == "native") == expect_native
    assert cpu_path.plan(w, 8, 1) == "int4pack"
    w128, _ = make_layer(64, 192, 4, 128)  # 128 does not divide K: never native
    assert cpu_path.plan(w128, 8, 8) != "native"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_and_leading_dims(dtype):
    w, bank = make_layer(48, 96, 4, 32)
    x = torch.randn(2, 3, 96).to(dtype)
    slots = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    y = multi_tenant_linear(x, w, bank, slots)
    assert y.shape == (2, 3, 48) and y.dtype == dtype
    x2 = x.reshape(6, 96).float()  # the rounded inputs are the exact inputs of the reference
    assert within_bound(y.reshape(6, 48), _ref(x2, w, bank, slots), x2, w, bank, slots, 2**-5)


def test_slot_groups_cache_follows_in_place_changes():
    slots = torch.tensor([1, 1, 1], dtype=torch.int32)
    assert cpu_path.slot_groups(slots) == [(1, None)]
    slots[1] = 4  # in place: bumps the version counter
    groups = cpu_path.slot_groups(slots)
    assert [g[0] for g in groups] == [1, 4] and groups[0][1].tolist() == [0, 2] and groups[1][1].tolist() == [1]


def test_scale_bank_update_is_seen():
    w, bank = make_layer(48, 96, 4, 32)
    x = torch.randn(2, 96)
    slots = torch.tensor([2, 3], dtype=torch.int32)
    multi_tenant_linear(x, w, bank, slots)
    bank[3].mul_(2.0)  # a tenant's scales replaced in place between steps
    assert within_bound(multi_tenant_linear(x, w, bank, slots), _ref(x, w, bank, slots), x, w, bank, slots, 2**-5)


def test_errors():
    w, bank = make_layer(48, 96, 4, 32)
    with pytest.raises(ValueError, match="K=96"):
        multi_tenant_linear(torch.randn(2, 95), w, bank)
    with pytest.raises(ValueError, match="scale_bank"):
        multi_tenant_linear(torch.randn(2, 96), w, bank[:, :, :2])
    with pytest.raises(ValueError, match="slot_ids"):
        multi_tenant_linear(torch.randn(2, 96), w, bank, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend must be one of"):
        multi_tenant_linear(torch.randn(2, 96), w, bank, backend="gpu")


def _autograd_ref(x, w, bank, slots):
    """Loss gradients through the dequantized reference (plain autograd)."""
    x = x.clone().requires_grad_(True)
    bank = bank.clone().requires_grad_(True)
    M = x.shape[0]
    sl = torch.zeros(M, dtype=torch.int64) if slots is None else slots.long()
    rows = []
    for r in range(M):
        wr = dequantize(w.qweight, w.zeros, bank[sl[r]], w.bits, w.in_features, w.group_size)  # (N, K)
        rows.append(wr @ x[r])
    y = torch.stack(rows)
    return y, x, bank


@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradients_against_autograd(group_size, mixed, backend):
    N, K, M = 37, 100, 9
    w, bank = make_layer(N, K, 3, group_size)
    x = torch.randn(M, K)
    slots = make_slots(M, bank.shape[0], mixed)
    grad_out = torch.randn(M, N)
    y_ref, x_ref, bank_ref = _autograd_ref(x, w, bank, slots)
    (y_ref * grad_out).sum().backward()
    xg, bg = x.clone().requires_grad_(True), bank.clone().requires_grad_(True)
    y = multi_tenant_linear(xg, w, bg, slots, backend=backend)
    (y * grad_out).sum().backward()
    assert rel_err(xg.grad, x_ref.grad) < 1e-4
    assert rel_err(bg.grad, bank_ref.grad) < 1e-4
    unused = sorted(set(range(bank.shape[0])) - set((slots if slots is not None else torch.zeros(1)).tolist()))
    assert torch.all(bg.grad[unused] == 0)


def test_gradient_only_for_scales():
    w, bank = make_layer(37, 64, 4, 32)
    bg = bank.clone().requires_grad_(True)
    y = multi_tenant_linear(torch.randn(3, 64), w, bg, torch.tensor([1, 1, 2], dtype=torch.int32))
    y.sum().backward()
    assert bg.grad.shape == bank.shape and torch.all(bg.grad[0] == 0) and bg.grad[1].abs().sum() > 0


def test_two_threads_with_their_own_banks_never_mix_scales():
    """Serving and fine-tuning call the same layer from two threads with different banks at once (this was a
    real race in the per-bank (scale, zero) cache); every result must match its own bank's reference."""
    import threading

    from scaleswap.kernels.ops import PackedLinearWeight, multi_tenant_linear
    from scaleswap.kernels.packing import pack_bits
    from scaleswap.kernels.reference import multi_tenant_linear_ref

    torch.manual_seed(0)
    N, K, gs = 64, 128, 64
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    z = torch.randint(0, 16, (N, K // gs), dtype=torch.uint8)
    w = PackedLinearWeight(pack_bits(q, 4), z, 4, K, N, gs)
    x = torch.randn(2, K)
    banks = [torch.rand(3, N, K // gs) + 0.5 for _ in range(2)]
    refs = [multi_tenant_linear_ref(x, w.qweight, z, b, torch.tensor([1, 2]), 4, K, gs) for b in banks]
    errors: list[str] = []

    def worker(i: int) -> None:
        slots = torch.tensor([1, 2], dtype=torch.int32)
        for _ in range(200):
            y = multi_tenant_linear(x, w, banks[i], slots, backend="cpu")
            # bf16 activations: ~3 significant digits; another bank's scales would be off by ~50 %
            if (y - refs[i]).abs().max() > 1e-2 * refs[i].abs().max():
                errors.append(f"thread {i}: max diff {(y - refs[i]).abs().max().item():.3g}")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
