"""The InfoNCE family: every fused backend against the reference formulas
(values and gradients of every differentiable input, temperature/scale
included), on fresh random inputs at odd sizes, plus the custom-op contract
(gradcheck, opcheck, torch.compile)."""

import pytest
import torch

import pyclloss
from pyclloss.ops import info_nce as core
from pyclloss.reference import info_nce as ref

from helpers import check_against_reference, fused_backends, random_labels, unit_rows

CPU_BACKENDS = fused_backends("cpu")
# The Triton interpreter is slow: it gets the small sizes only.
SIZES = {"cpp": (2, 5, 37, 130), "triton": (2, 19)}
def _sizes(backend):
    return SIZES.get(backend, (2, 37))


def _unit_pair(n, d=40):
    """Paired image/text embeddings on the unit sphere (CLIP losses do not normalise)."""
    return [unit_rows(n, d), unit_rows(n, d)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent(backend, dtype, reduction):
    for b in _sizes(backend):
        z1, z2 = torch.randn(b, 24), torch.randn(b, 24)
        temp = torch.tensor(0.3)
        check_against_reference(
            lambda a, c, t: pyclloss.nt_xent(a, c, t, reduction=reduction, backend=backend),
            lambda a, c, t: ref.nt_xent(a, c, t, reduction=reduction),
            [z1, z2, temp], dtype, f"nt_xent B={b}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_supcon_2d(backend, dtype):
    for n in _sizes(backend):
        x, y = torch.randn(n, 33), random_labels(n, 3)
        check_against_reference(
            lambda f, t: pyclloss.supcon(f, y, t, 0.07, backend=backend),
            lambda f, t: ref.supcon(f, y, t, 0.07),
            [x, torch.tensor(0.1)], dtype, f"supcon N={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supcon_multiview_and_weights(backend):
    b = _sizes(backend)[-1]
    x, w = torch.randn(b, 2, 16), torch.rand(b)
    for labels in (None, random_labels(b, 4)):
        check_against_reference(
            lambda f: pyclloss.supcon(f, labels, 0.2, weights=w, backend=backend),
            lambda f: ref.supcon(f, labels, 0.2, weights=w),
            [x], torch.float32, f"supcon 3-D labels={labels is not None}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_supcon_anchor_without_positive_is_left_out(backend):
    x = torch.randn(5, 8)
    y = torch.tensor([0, 0, 1, 2, 2])  # anchor 2 has no positive
    per_anchor = pyclloss.supcon(x, y, reduction="none", backend=backend)
    assert per_anchor[2].item() == 0.0
    mean = pyclloss.supcon(x, y, backend=backend)
    expected = per_anchor[[0, 1, 3, 4]].mean()
    assert torch.allclose(mean, expected, rtol=1e-6)
    # a row's loss, LSE minus the positives' mean logit, cancels logits up to
    # 1/t = 10 (the default t); the loss itself can be far smaller
    logit_size = 10.0
    assert torch.allclose(mean, ref.supcon(x.double(), y).float(), rtol=1e-5,
                          atol=1e-5 * logit_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pair_nt_xent(backend, dtype):
    for n in _sizes(backend):
        x, y = torch.randn(n, 20), random_labels(n, max(2, n // 4))
        check_against_reference(
            lambda f, t: pyclloss.pair_nt_xent(f, y, t, backend=backend),
            lambda f, t: ref.pair_nt_xent(f, y, t),
            [x, torch.tensor(0.07)], dtype, f"pair_nt_xent N={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_pair_nt_xent_degenerate_labels(backend):
    x = torch.randn(6, 8, requires_grad=True)
    # all distinct: no positive pair -> 0; all equal: no negative -> each pair 0
    for y in (torch.arange(6), torch.zeros(6, dtype=torch.long)):
        loss = pyclloss.pair_nt_xent(x, y, backend=backend)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(x.grad).all()
        x.grad = None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_info_nce_targets_queue_weights(backend, dtype):
    for n in _sizes(backend):
        m, nq = n + 3, 2 * n + 1
        q, k, queue = torch.randn(n, 16), torch.randn(m, 16), torch.randn(nq, 16)
        targets, w = torch.randint(0, m, (n,)), torch.rand(n)
        check_against_reference(
            lambda a, c, t: pyclloss.info_nce(a, c, t, targets, queue.to(dtype), w,
                                              backend=backend),
            lambda a, c, t: ref.info_nce(a, c, t, targets, queue.double(), w),
            [q, k, torch.tensor(0.2)], dtype, f"info_nce N={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_info_nce_unnormalized_sum(backend):
    n = _sizes(backend)[-1]
    q, k = torch.randn(n, 12) * 0.3, torch.randn(n, 12) * 0.3
    check_against_reference(
        lambda a, c: pyclloss.info_nce(a, c, 0.5, normalize=False, reduction="sum",
                                       backend=backend),
        lambda a, c: ref.info_nce(a, c, 0.5, normalize=False, reduction="sum"),
        [q, k], torch.float32, "info_nce unnormalized")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_clip_loss(backend, dtype):
    for n in _sizes(backend):
        check_against_reference(
            lambda a, b, s: pyclloss.clip_loss(a, b, s, backend=backend),
            ref.clip_loss, [*_unit_pair(n), torch.tensor(14.3)], dtype, f"clip N={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_siglip_loss(backend, dtype):
    for n in _sizes(backend):
        check_against_reference(
            lambda a, b, s, c: pyclloss.siglip_loss(a, b, s, c, backend=backend),
            ref.siglip_loss, [*_unit_pair(n), torch.tensor(10.0), torch.tensor(-10.0)], dtype,
            f"siglip N={n}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_low_temperature_fp16_is_finite(backend):
    n = _sizes(backend)[-1]
    z1 = torch.randn(n, 32).half().requires_grad_()
    z2 = (z1.detach() + 0.01 * torch.randn(n, 32).half()).requires_grad_()
    loss = pyclloss.nt_xent(z1, z2, 0.01, backend=backend)
    loss.backward()
    expected = ref.nt_xent(z1.detach().double(), z2.detach().double(), 0.01)
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()
    assert abs(loss.item() - expected.item()) <= 2e-2 * max(1.0, expected.item())


# ------------------------------------------------------------- the op contract


def _op_inputs(dtype, n=7, m=9, d=5):
    q = torch.randn(n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(m, d, dtype=dtype, requires_grad=True)
    scale = torch.tensor(1.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         requires_grad=True)
    return q, k, scale, torch.randint(0, 3, (n,)), torch.randint(0, 3, (m,))


GRADCHECK_BACKENDS = [b for b in ("reference", "cpp") if pyclloss.backends()[b].available]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("mode", ["rows", "neg_only", "columns", "pair", "siglip"])
def test_gradcheck_float64(backend, mode):
    q, k, scale, ql, kl = _op_inputs(torch.float64)

    def fn(q, k, scale):
        if mode == "siglip":
            bias = torch.tensor(-0.5, dtype=torch.float64)
            return core.siglip_fwd(q, k, scale, bias, ql, kl, backend)
        if mode == "pair":
            neg = core.infonce_fwd(q, k, scale, ql, kl, 1, True, False, backend)[0]
            return core.infonce_pair_fwd(q, k, scale, ql, kl, 1, neg, backend)[0]
        row, pos, _, col = core.infonce_fwd(q, k, scale, ql, kl, -1, mode == "neg_only",
                                            mode == "columns", backend)
        return (row, pos, col) if mode == "columns" else (row, pos)

    assert torch.autograd.gradcheck(fn, (q, k, scale))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_opcheck(backend):
    dtype = torch.float32
    q, k, scale, ql, kl = _op_inputs(dtype)
    lse = torch.randn(q.shape[0])
    opcheck = torch.library.opcheck
    opcheck(core.infonce_fwd, (q, k, scale, ql, kl, 0, False, True, backend))
    opcheck(core.infonce_fwd, (q, k, scale, None, None, None, False, False, backend))
    opcheck(core.infonce_pair_fwd, (q, k, scale, ql, kl, 0, lse, backend))
    opcheck(core.siglip_fwd, (q, k, scale, torch.tensor(-1.0), ql, kl, backend))
    coef = torch.rand(q.shape[0])
    opcheck(core.infonce_bwd, (q.detach(), k.detach(), scale.detach(), ql, kl, 0, False, lse,
                               coef, None, None, coef, None, True, backend))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="C++ extension not built")
def test_torch_compile_module_has_no_graph_break():
    loss_fn = pyclloss.SupConLoss(temperature=0.1, backend="cpp")
    x, y = torch.randn(33, 16, requires_grad=True), torch.randint(0, 4, (33,))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    expected = ref.supcon(x.detach().double(), y)
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))
    assert torch.isfinite(x.grad).all()


def test_moco_queue_is_fifo():
    torch_backend = "cpp" if "cpp" in CPU_BACKENDS else "reference"
    moco = pyclloss.MoCoLoss(dim=8, queue_size=5, temperature=0.2, backend=torch_backend)
    q, k = torch.randn(3, 8), torch.randn(3, 8)
    before = moco.queue.clone()
    loss = moco(q, k)
    expected = ref.info_nce(q.double(), k.double(), 0.2, queue=before.double(),
                            in_batch_negatives=False)
    assert abs(loss.item() - expected.item()) < 1e-5 * max(1.0, expected.item())
    unit_k = torch.nn.functional.normalize(k, dim=1)
    assert torch.allclose(moco.queue[:3], unit_k) and torch.equal(moco.queue[3:], before[3:])
    moco(q[:2], k[:2] * 2)
    assert torch.allclose(moco.queue[3:5], unit_k[:2]) and int(moco.queue_ptr) == 0
