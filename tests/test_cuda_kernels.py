"""The CUDA kernels of the fused InfoNCE core against the float64 reference.

Calls the five ops of ``torch.ops.pyclloss_C`` on CUDA tensors and compares
every output with ``pyclloss.reference.info_nce`` run in float64 on the same
(already rounded) inputs on the GPU. Odd sizes (not multiples of the tiles),
N = 1 and 2, M != N, D = 3 (unaligned rows), 129, 512 and 600 (two D ranges in
the backward), every mask flag and every gradient term.
"""

import pytest
import torch

from pyclloss.reference import info_nce as ref

try:
    import pyclloss._C as _C

    CUDA_KERNELS = _C.built_with_cuda()
except ImportError:
    CUDA_KERNELS = False

DEVICE = "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and CUDA_KERNELS),
                       reason="needs a CUDA GPU and the extension built with CUDA"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}

# (N, M, D)
SHAPES = [(1, 1, 3), (2, 2, 129), (2, 5, 512), (37, 37, 3), (37, 53, 129), (53, 37, 512),
          (1000, 1000, 129), (1000, 777, 512), (777, 1000, 3), (200, 150, 600)]

# InfoNCE masks: (labels, exclude_offset, neg_only, col_stats); offsets are
# resolved against N (None, 0, a shift of half the rows, out of range).
MODES = {
    "clip": (False, None, False, True),
    "self_excluded": (False, 0, False, True),
    "supcon": (True, 0, False, False),
    "negatives": (True, 0, True, False),
    "shifted": (True, "half", False, True),
    "out_of_range": (True, "beyond", False, False),
}


def ops():
    return torch.ops.pyclloss_C


def embeddings(n, d, dtype):
    x = torch.nn.functional.normalize(torch.randn(n, d, device=DEVICE), dim=1)
    return x.to(dtype).contiguous()


def resolve_offset(offset, n):
    return {"half": n // 2, "beyond": n + 3}.get(offset, offset)


def assert_close(name, got, want, tol):
    """Same shape, same non-finite entries, max error within tol of the largest entry."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{name}: non-finite entries differ"
    assert torch.equal(got[~finite], want[~finite]), f"{name}: infinite entries differ"
    if finite.any():
        error = (got[finite] - want[finite]).abs().max().item()
        size = want[finite].abs().max().item()
        assert error <= tol * max(size, 1e-12), f"{name}: max error {error:.3g}, largest {size:.3g}"


def assert_all_close(names, got, want, tol):
    for name, g, w in zip(names, got, want):
        assert_close(name, g, w, tol)


def assert_sum_close(name, got, want, mass, tol):
    """dscale and dbias sum N·M signed terms that largely cancel: their error is
    measured against the sum of the terms' magnitudes."""
    error = abs(got.item() - want.item())
    bound = tol * max(abs(want.item()), mass, 1e-12)
    assert error <= bound, f"{name}: error {error:.3g}, allowed {bound:.3g} (sum |terms| {mass:.3g})"


def check_infonce_bwd(p, offset, neg_only, terms, need_dk):
    """infonce_bwd against the reference: dq, dk, and dscale against sum |G_ij dot_ij|."""
    got = ops().infonce_bwd(*p.inputs(), offset, neg_only, *terms, need_dk)
    exact = double(*terms)
    want = ref.infonce_bwd(*p.reference_inputs(), offset, neg_only, *exact, need_dk)
    grad, dot = ref.infonce_grad_logits(*p.reference_inputs(), offset, neg_only, *exact)
    assert_all_close(["dq", "dk"], got[:2], want[:2], p.tol)
    assert_sum_close("dscale", got[2], want[2], (grad * dot).abs().sum().item(), p.tol)
    assert got[0].dtype == p.q.dtype and got[1].dtype == p.q.dtype
    assert got[2].dtype == torch.float32 and got[1].shape == (p.k.shape if need_dk else (0,))


def zero_where_infinite(coef, lse):
    """A coefficient must be 0 where its LSE is -inf (an empty set)."""
    return torch.where(torch.isfinite(lse), coef, torch.zeros_like(coef))


def double(*tensors):
    return [t.double() if t is not None else None for t in tensors]


class Problem:
    """Random inputs of one test case, with the float64 copies the reference sees."""

    def __init__(self, n, m, d, dtype, labels=False, scale=1 / 0.07, classes=4):
        self.q, self.k = embeddings(n, d, dtype), embeddings(m, d, dtype)
        self.scale = torch.tensor(scale, device=DEVICE)
        self.q_labels = torch.randint(classes, (n,), device=DEVICE) if labels else None
        self.k_labels = torch.randint(classes, (m,), device=DEVICE) if labels else None
        self.tol = TOLERANCE[dtype]

    def inputs(self):
        return self.q, self.k, self.scale, self.q_labels, self.k_labels

    def reference_inputs(self):
        return self.q.double(), self.k.double(), self.scale.double(), self.q_labels, self.k_labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_infonce_fwd_and_bwd(mode, n, m, d, dtype):
    labels, offset, neg_only, col_stats = MODES[mode]
    offset = resolve_offset(offset, n)
    p = Problem(n, m, d, dtype, labels)
    got = ops().infonce_fwd(*p.inputs(), offset, neg_only, col_stats)
    want = ref.infonce_fwd(*p.reference_inputs(), offset, neg_only, col_stats)
    assert_all_close(["row_lse", "pos_sum", "pos_count", "col_lse"], got, want, p.tol)
    assert torch.equal(got[2], want[2].float()), "pos_count is an exact count"

    row_lse = want[0].float()
    col_lse = want[3].float() if col_stats else None
    row_coef = zero_where_infinite(torch.randn(n, device=DEVICE), row_lse)
    col_coef = zero_where_infinite(torch.randn(m, device=DEVICE), col_lse) if col_stats else None
    pos_coef = torch.randn(n, device=DEVICE) if labels else None
    check_infonce_bwd(p, offset, neg_only, (row_lse, row_coef, col_lse, col_coef, pos_coef, None),
                      need_dk=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_infonce_single_terms(n, m, d, dtype):
    """Each gradient term alone, and dk skipped."""
    p = Problem(n, m, d, dtype, labels=True)
    row_lse, _, _, col_lse = ref.infonce_fwd(*p.reference_inputs(), None, False, True)
    coef_n, coef_m = torch.randn(n, device=DEVICE), torch.randn(m, device=DEVICE)
    for terms in [(row_lse.float(), coef_n, None, None, None, None),
                  (None, None, col_lse.float(), coef_m, None, None),
                  (None, None, None, None, coef_n, None)]:
        check_infonce_bwd(p, None, False, terms, need_dk=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_infonce_pair_fwd_and_bwd(n, m, d, dtype):
    offset = 0
    p = Problem(n, m, d, dtype, labels=True, classes=3)
    neg_lse = ref.infonce_fwd(*p.reference_inputs(), offset, True, False)[0]
    got = ops().infonce_pair_fwd(*p.inputs(), offset, neg_lse.float())
    want = ref.infonce_pair_fwd(*p.reference_inputs(), offset, neg_lse)
    assert_all_close(["loss_sum", "sigmoid_sum"], got, want, p.tol)

    pos_coef = torch.randn(n, device=DEVICE)
    check_infonce_bwd(p, offset, False, (None, None, None, None, pos_coef, neg_lse.float()),
                      need_dk=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("labels", [False, True], ids=["diagonal_free", "labels"])
def test_siglip_fwd_and_bwd(labels, n, m, d, dtype):
    p = Problem(n, m, d, dtype, labels, scale=10.0)
    bias = torch.tensor(-10.0, device=DEVICE)
    got = ops().siglip_fwd(*p.inputs()[:3], bias, p.q_labels, p.k_labels)
    want = ref.siglip_fwd(*p.reference_inputs()[:3], bias.double(), p.q_labels, p.k_labels)
    assert_close("row_loss", got, want, p.tol)

    row_coef = torch.randn(n, device=DEVICE)
    dscale_mass, dbias_mass = siglip_grad_mass(p, bias, row_coef)
    for need_dk in (True, False):
        got = ops().siglip_bwd(*p.inputs()[:3], bias, p.q_labels, p.k_labels, row_coef, need_dk)
        want = ref.siglip_bwd(*p.reference_inputs()[:3], bias.double(), p.q_labels, p.k_labels,
                              row_coef.double(), need_dk)
        assert_all_close(["dq", "dk"], got[:2], want[:2], p.tol)
        assert_sum_close("dscale", got[2], want[2], dscale_mass, p.tol)
        assert_sum_close("dbias", got[3], want[3], dbias_mass, p.tol)


def siglip_grad_mass(p, bias, row_coef):
    """sum |G_ij dot_ij| and sum |G_ij| of SigLIP, G = row_coef (-z) sigmoid(-z (l + b))."""
    q, k, scale, q_labels, k_labels = p.reference_inputs()
    dot = q @ k.T
    if q_labels is None:
        z = -torch.ones_like(dot)
    else:
        z = torch.where(q_labels[:, None] == k_labels[None, :], 1.0, -1.0).to(dot)
    grad = row_coef.double()[:, None] * torch.sigmoid(-z * (scale * dot + bias.double()))
    return (grad * dot).abs().sum().item(), grad.abs().sum().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_temperature_is_finite(dtype):
    """τ = 0.01 on near-duplicate rows: no inf/NaN where float64 is finite."""
    n, d = 300, 64
    base = embeddings(n, d, torch.float32)
    q = base.to(dtype)
    k = torch.nn.functional.normalize(base + 1e-3 * torch.randn_like(base), dim=1).to(dtype)
    scale = torch.tensor(100.0, device=DEVICE)
    got = ops().infonce_fwd(q, k, scale, None, None, None, False, True)
    want = ref.infonce_fwd(q.double(), k.double(), scale.double(), None, None, None, False, True)
    assert_all_close(["row_lse", "pos_sum", "pos_count", "col_lse"], got, want, TOLERANCE[dtype])
    coef = torch.full((n,), 1.0 / n, device=DEVICE)
    got = ops().infonce_bwd(q, k, scale, None, None, None, False, got[0], coef, got[3], coef,
                            None, None, True)
    assert all(torch.isfinite(g).all() for g in got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_small_gradients_keep_precision(dtype):
    """Coefficients of 1e-4 make G ~ 1e-7, below fp16's normal range: the
    kernels scale G before rounding it for the second product."""
    n, m, d = 700, 600, 64
    p = Problem(n, m, d, dtype, scale=1.0)
    row_lse, _, _, col_lse = ref.infonce_fwd(*p.reference_inputs(), None, False, True)
    p.tol = 1e-2
    terms = (row_lse.float(), torch.full((n,), 1e-4, device=DEVICE), col_lse.float(),
             torch.full((m,), 1e-4, device=DEVICE), None, None)
    check_infonce_bwd(p, None, False, terms, need_dk=True)


def test_empty_key_set_gives_minus_infinity():
    q = embeddings(5, 16, torch.float32)
    k = embeddings(0, 16, torch.float32)
    scale = torch.tensor(2.0, device=DEVICE)
    row_lse, pos_sum, pos_count, col_lse = ops().infonce_fwd(q, k, scale, None, None, None, False,
                                                             True)
    assert torch.all(row_lse == float("-inf")) and torch.all(pos_sum == 0)
    assert col_lse.shape == (0,)
    dq, dk, dscale = ops().infonce_bwd(q, k, scale, None, None, None, False, row_lse,
                                       torch.zeros(5, device=DEVICE), None, None, None, None, True)
    assert torch.all(dq == 0) and dk.shape == (0, 16) and dscale.item() == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_deterministic(dtype):
    p = Problem(1000, 900, 129, dtype, labels=True)
    row_lse, _, _, col_lse = ref.infonce_fwd(*p.reference_inputs(), 0, False, True)
    terms = (row_lse.float(), torch.randn(1000, device=DEVICE), col_lse.float(),
             torch.randn(900, device=DEVICE), torch.randn(1000, device=DEVICE), None)
    first = ops().infonce_bwd(*p.inputs(), 0, False, *terms, True)
    second = ops().infonce_bwd(*p.inputs(), 0, False, *terms, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bad_arguments_raise():
    q = embeddings(4, 8, torch.float32)
    scale = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(RuntimeError, match="col_stats"):
        ops().infonce_fwd(q, q, scale, None, None, None, True, True)
    with pytest.raises(RuntimeError, match="scale"):
        ops().infonce_fwd(q, q, torch.tensor([1.0, 2.0], device=DEVICE), None, None, None, False,
                          False)
    with pytest.raises(RuntimeError, match="together"):
        ops().infonce_fwd(q, q, scale, torch.zeros(4, dtype=torch.long, device=DEVICE), None,
                          None, False, False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops().infonce_fwd(q, q.half(), scale, None, None, None, False, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        wide = embeddings(8, 8, torch.float32)
        ops().infonce_fwd(wide.t(), wide, scale, None, None, None, False, False)
