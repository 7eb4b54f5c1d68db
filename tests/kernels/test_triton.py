"""Triton kernels against the float32 reference.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before any
Triton kernel module is imported); on a CUDA machine (bench/gpu_check.sh) the same tests run compiled
and autotuned. Shapes are small and not multiples of the block sizes (the interpreter is slow).

Tolerances, max |y − ref| / max |ref|: float32 X 1e-5 (IEEE fp32 dots); float16 X 2e-3 (X rounded
to fp16 in the reference input too, so only the fp16 output rounding and accumulation order remain);
bfloat16 (GPU only: the interpreter has no bf16) 1e-2.
"""

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernel_cases import make_layer, make_slots, rel_err  # noqa: E402

from scaleswap.kernels.ops import multi_tenant_linear  # noqa: E402
from scaleswap.kernels.reference import multi_tenant_linear_ref  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _run(N, K, bits, group_size, M, mixed, dtype=torch.float32, bias=False, config=None, seed=0):
    w, bank = make_layer(N, K, bits, group_size, bias=bias, seed=seed)
    x = torch.randn(M, K).to(dtype)
    slots = make_slots(M, bank.shape[0], mixed)
    ref = multi_tenant_linear_ref(x.float(), w.qweight, w.zeros, bank, slots, bits, K, group_size, w.bias)
    wd, bd, xd = w.to(DEVICE), bank.to(DEVICE), x.to(DEVICE)
    sd = None if slots is None else slots.to(DEVICE)
    if config is None:
        y = multi_tenant_linear(xd, wd, bd, sd, backend="triton")
    elif group_size == -1:
        from scaleswap.kernels.triton_per_channel import per_channel_linear

        y = per_channel_linear(xd, wd.qweight, wd.zeros, bd, sd, wd.bias, bits, config=config)
    else:
        from scaleswap.kernels.triton_group_wise import group_wise_linear

        y = group_wise_linear(xd, wd.qweight, wd.zeros, bd, sd, wd.bias, bits, group_size, config=config)
    assert y.shape == (M, N) and y.dtype == dtype and y.device.type == DEVICE
    return y.cpu(), ref


CASES = [  # (bits, M): bits {3, 4} at every M, 2-bit at small M
    (3, 1), (3, 5), (3, 64), (4, 1), (4, 5), (4, 64), (2, 1), (2, 5),
]


@pytest.mark.parametrize("bits,M", CASES)
@pytest.mark.parametrize("mixed", [False, True])
def test_per_channel(bits, M, mixed):
    N, K = (67, 200) if M < 64 else (40, 72)
    y, ref = _run(N, K, bits, -1, M, mixed, bias=mixed)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits,M", CASES)
@pytest.mark.parametrize("mixed", [False, True])
def test_group_wise(group_size, bits, M, mixed):
    # K = 200 is not a multiple of any group size: the last group is partial
    N, K = (67, 200) if M < 64 else (40, 200)
    y, ref = _run(N, K, bits, group_size, M, mixed, bias=mixed)
    assert rel_err(y, ref) < 1e-5


def test_eight_bit():
    y, ref = _run(33, 70, 8, -1, 3, True)
    assert rel_err(y, ref) < 1e-5
    y, ref = _run(33, 70, 8, 32, 3, True)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("group_size", [-1, 64])
def test_split_k_and_other_tiles(group_size):
    # exercises the atomic split-K epilogue (with bias added once) and wider tiles
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 1, "SPLIT_K": 3}
    if group_size == -1:
        cfg["BLOCK_K"] = 64
    y, ref = _run(67, 300, 3, group_size, 5, True, bias=True, config=cfg)
    assert rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("group_size", [-1, 32])
def test_float16_input(group_size):
    y, ref = _run(67, 200, 4, group_size, 5, True, dtype=torch.float16)
    assert rel_err(y, ref) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (Triton's interpreter has no bfloat16)")
@pytest.mark.parametrize("group_size", [-1, 64])
@pytest.mark.parametrize("M", [1, 37, 600])
def test_bfloat16_and_prefill_shapes_on_gpu(group_size, M):
    y, ref = _run(1000, 576, 4, group_size, M, True, dtype=torch.bfloat16)
    assert rel_err(y, ref) < 1e-2
    y, ref = _run(1000, 576, 3, group_size, M, True, dtype=torch.float16)
    assert rel_err(y, ref) < 2e-3


def test_three_d_input_and_gradients_through_triton_forward():
    w, bank = make_layer(40, 96, 3, 32)
    x = torch.randn(2, 3, 96, device=DEVICE, requires_grad=True)
    bd = bank.to(DEVICE).requires_grad_(True)
    slots = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32, device=DEVICE)
    y = multi_tenant_linear(x, w.to(DEVICE), bd, slots, backend="triton")
    assert y.shape == (2, 3, 40)
    y.sum().backward()
    xr, br = x.detach().clone().requires_grad_(True), bd.detach().clone().requires_grad_(True)
    multi_tenant_linear(xr, w.to(DEVICE), br, slots, backend="reference").sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-4 and rel_err(bd.grad, br.grad) < 1e-4
