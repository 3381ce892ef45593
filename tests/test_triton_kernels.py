"""Triton kernels of the fused InfoNCE core against the dense reference.

Without CUDA the kernels run under Triton's interpreter on CPU tensors (small
sizes, fp32 and fp16: the interpreter computes bf16 tl.dot wrongly). The `gpu`
class repeats the checks on CUDA at larger sizes, bf16 included.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from pyclloss.reference import info_nce as ref  # noqa: E402
from pyclloss.triton_kernels import info_nce as tri  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# The interpreter evaluates log(0) for empty sets and padding rows in numpy.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


# ------------------------------------------------------------------------- helpers


def assert_matches(actual, expected, rtol, magnitude=None):
    """Equal infinities, no NaN, finite values within rtol of `magnitude`
    (default: the largest expected value; for a sum whose terms cancel, the
    sum of the terms' absolute values), or within the spacing of the result
    dtype's subnormals (the rounding of a tiny fp16 gradient)."""
    assert not torch.isnan(actual).any(), "NaN in the Triton result"
    finfo = torch.finfo(actual.dtype)
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape
    finite = torch.isfinite(expected)
    assert torch.equal(actual[~finite], expected[~finite]), "infinities differ"
    if magnitude is None:
        magnitude = expected[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=rtol,
                               atol=max(rtol * magnitude, finfo.tiny * finfo.eps))


class Problem:
    """Random unit-norm q (N×D), k (M×D) in a dtype, labels from a few classes."""

    def __init__(self, n, m, d, dtype, device, labels=True, scale=1 / 0.07, classes=3):
        self.q = F.normalize(torch.randn(n, d), dim=1).to(device, dtype)
        self.k = F.normalize(torch.randn(m, d), dim=1).to(device, dtype)
        self.scale = torch.tensor(scale, dtype=torch.float32, device=device)
        self.bias = torch.tensor(-2.5, dtype=torch.float32, device=device)
        if labels:
            self.q_labels = torch.randint(0, classes, (n,)).to(device)
            self.k_labels = torch.randint(0, classes, (m,)).to(device)
        else:
            self.q_labels = self.k_labels = None
        self.device = device
        self.rtol = RTOL[dtype]

    def randn(self, size):
        return torch.randn(size).to(self.device)

    def tri(self, fn, *args):
        return getattr(tri, fn)(self.q, self.k, self.scale, *args)

    def ref(self, fn, *args):
        """The reference on float64 copies of the same inputs."""
        args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        return getattr(ref, fn)(self.q.double(), self.k.double(), self.scale.double(), *args)

    def check(self, fn, *args, magnitudes=None):
        """Runs fn on both sides and compares every output; `magnitudes` maps
        an output's index to its error scale (see assert_matches)."""
        outs = self.tri(fn, *args)
        expected = self.ref(fn, *args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for index, (a, e) in enumerate(zip(outs, expected)):
            assert a.device == self.q.device
            try:
                assert_matches(a, e, self.rtol, (magnitudes or {}).get(index))
            except AssertionError as err:
                raise AssertionError(f"{fn} output {index}: {err}") from None
        return outs

    def logit_grad(self, fn, *args):
        """The dense G and dot of a backward, for the error scale of dscale and dbias."""
        q, k = self.q.double(), self.k.double()
        if fn == "infonce_bwd":
            args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                    for a in args[:-1]]
            return ref.infonce_grad_logits(q, k, self.scale.double(), *args)
        bias, q_labels, k_labels, row_coef, _ = args
        dot = q @ k.T
        neg_z = torch.ones_like(dot)
        if q_labels is not None:
            neg_z[q_labels[:, None] == k_labels[None, :]] = -1.0
        logits = self.scale.double() * dot + bias.double()
        return row_coef.double()[:, None] * neg_z * torch.sigmoid(neg_z * logits), dot

    def check_bwd(self, fn, *args):
        grad, dot = self.logit_grad(fn, *args)
        magnitudes = {2: (grad * dot).abs().sum().item(), 3: grad.abs().sum().item()}
        return self.check(fn, *args, magnitudes=magnitudes)


# The grids below are small on purpose: every case runs under the interpreter.
SHAPES = [(1, 1, 3), (2, 37, 33), (37, 2, 3), (100, 37, 33), (37, 255, 3)]
DTYPES = [torch.float32, torch.float16]
# (labels, exclude_offset, neg_only, col_stats)
FWD_MODES = [
    (False, None, False, True),
    (False, 0, False, True),
    (True, 0, False, True),
    (True, -2, True, False),
    (True, None, True, False),
    (True, 5, False, True),
]
# (row term, column term, positive term, pair_lse)
BWD_TERMS = [
    (True, False, False, False),
    (False, True, False, False),
    (False, False, True, False),
    (False, False, True, True),
    (True, True, True, True),
]


def bwd_args(p, exclude_offset, neg_only, terms, need_dk):
    """infonce_bwd's arguments after the inputs: statistics from the reference
    forward, random coefficients, 0 on rows/columns whose LSE is -inf."""
    row_term, col_term, pos_term, use_pair = terms
    row_lse, _, _, col_lse = p.ref("infonce_fwd", p.q_labels, p.k_labels, exclude_offset,
                                   neg_only, not neg_only)
    row_lse, col_lse = row_lse.float(), col_lse.float()
    n, m = p.q.shape[0], p.k.shape[0]
    row_coef = torch.where(torch.isinf(row_lse), 0.0, p.randn(n))
    col_coef = torch.where(torch.isinf(col_lse), 0.0, p.randn(m)) if col_lse.numel() else None
    pair_lse = p.randn(n) + 2.0
    if use_pair:
        pair_lse[0] = float("-inf")
    return (p.q_labels, p.k_labels, exclude_offset, neg_only,
            row_lse if row_term else None, row_coef if row_term else None,
            col_lse if col_term else None, col_coef if col_term else None,
            p.randn(n) if pos_term else None, pair_lse if use_pair else None, need_dk)


def run_fwd(p, exclude_offset, neg_only, col_stats):
    row_lse, pos_sum, pos_count, col_lse = p.check(
        "infonce_fwd", p.q_labels, p.k_labels, exclude_offset, neg_only, col_stats)
    assert row_lse.dtype == torch.float32
    assert col_lse.shape == ((p.k.shape[0],) if col_stats else (0,))


def run_pair(p, exclude_offset):
    neg_lse = p.ref("infonce_fwd", p.q_labels, p.k_labels, exclude_offset, True, False)[0]
    p.check("infonce_pair_fwd", p.q_labels, p.k_labels, exclude_offset, neg_lse.float())


def run_bwd(p, exclude_offset, neg_only, terms, need_dk):
    if terms[1] and neg_only:
        neg_only = False  # column statistics exist only without neg_only
    dq, dk, dscale = p.check_bwd("infonce_bwd",
                                 *bwd_args(p, exclude_offset, neg_only, terms, need_dk))
    assert dq.dtype == p.q.dtype and dscale.shape == ()
    assert dk.shape == (p.k.shape if need_dk else (0,))


def run_siglip(p, need_dk):
    p.check("siglip_fwd", p.bias, p.q_labels, p.k_labels)
    row_coef = p.randn(p.q.shape[0])
    p.check_bwd("siglip_bwd", p.bias, p.q_labels, p.k_labels, row_coef, need_dk)


# --------------------------------------------------------- interpreter (or small GPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", FWD_MODES, ids=str)
def test_infonce_fwd(shape, dtype, mode):
    labels, exclude_offset, neg_only, col_stats = mode
    run_fwd(Problem(*shape, dtype, DEVICE, labels=labels), exclude_offset, neg_only, col_stats)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("exclude_offset", [None, 0, -3])
def test_infonce_pair_fwd(shape, dtype, exclude_offset):
    run_pair(Problem(*shape, dtype, DEVICE), exclude_offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("terms", BWD_TERMS, ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 33), (100, 37, 3)], ids=str)
def test_infonce_bwd_terms(shape, dtype, terms):
    run_bwd(Problem(*shape, dtype, DEVICE), 0, True, terms, True)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("exclude_offset,neg_only,labels,need_dk",
                         [(None, False, False, True), (0, True, True, False),
                          (-2, False, True, True)])
def test_infonce_bwd_all_terms(shape, exclude_offset, neg_only, labels, need_dk):
    p = Problem(*shape, torch.float32, DEVICE, labels=labels)
    run_bwd(p, exclude_offset, neg_only, BWD_TERMS[-1], need_dk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("labels,need_dk", [(False, True), (True, False), (True, True)])
def test_siglip(shape, dtype, labels, need_dk):
    run_siglip(Problem(*shape, dtype, DEVICE, labels=labels), need_dk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 45, 129), (5, 7, 300)], ids=str)
def test_wide_features(shape, dtype):
    """D over several dot chunks and several dq/dk slices, with a ragged last one."""
    p = Problem(*shape, dtype, DEVICE)
    run_fwd(p, 0, False, True)
    run_pair(p, -1)
    run_bwd(p, 0, False, BWD_TERMS[-1], True)
    run_siglip(p, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tiny_coefficients(dtype):
    """Coefficients of 1/N for a large N: the gradients keep their relative
    precision in fp16 instead of underflowing."""
    p = Problem(37, 100, 33, dtype, DEVICE)
    args = list(bwd_args(p, 0, False, BWD_TERMS[-1], True))
    for index in (5, 7, 8):  # row_coef, col_coef, pos_coef
        args[index] = args[index] * 1e-6
    p.check_bwd("infonce_bwd", *args)
    p.check_bwd("siglip_bwd", p.bias, p.q_labels, p.k_labels, 1e-6 * p.randn(37), True)


def test_empty_sets_are_exact():
    """Rows with nothing in their set end at exactly -inf; 0 coefficients there
    give 0 gradients, not NaN."""
    p = Problem(37, 37, 33, torch.float32, DEVICE, classes=1)  # every pair positive
    row_lse = p.check("infonce_fwd", p.q_labels, p.k_labels, 0, True, False)[0]
    assert torch.isneginf(row_lse).all()
    loss_sum, sigmoid_sum = tri.infonce_pair_fwd(p.q, p.k, p.scale, p.q_labels, p.k_labels,
                                                 0, row_lse)
    assert torch.equal(loss_sum, torch.zeros_like(loss_sum))
    assert torch.equal(sigmoid_sum, torch.zeros_like(sigmoid_sum))
    zeros = torch.zeros_like(row_lse)
    dq, dk, dscale = tri.infonce_bwd(p.q, p.k, p.scale, p.q_labels, p.k_labels, 0, True,
                                     row_lse, zeros, None, None, None, None, True)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    assert dscale.item() == 0.0
    # A single row that excludes its only key.
    p = Problem(1, 1, 3, torch.float32, DEVICE, labels=False)
    row_lse, _, _, col_lse = tri.infonce_fwd(p.q, p.k, p.scale, None, None, 0, False, True)
    assert torch.isneginf(row_lse).all() and torch.isneginf(col_lse).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_low_temperature(dtype):
    """scale = 100 (τ = 0.01): the online LSE stays finite and accurate."""
    p = Problem(100, 37, 33, dtype, DEVICE, scale=100.0)
    run_fwd(p, 0, False, True)
    run_pair(p, 0)
    run_bwd(p, 0, False, BWD_TERMS[-1], True)
    run_siglip(p, True)


def test_bad_input():
    p = Problem(4, 5, 3, torch.float32, DEVICE)
    with pytest.raises(TypeError, match="dtype"):
        tri.infonce_fwd(p.q, p.k.half(), p.scale, None, None, None, False, False)
    with pytest.raises(ValueError, match="neg_only"):
        tri.infonce_fwd(p.q, p.k, p.scale, p.q_labels, p.k_labels, None, True, True)
    with pytest.raises(ValueError, match="labels"):
        tri.infonce_fwd(p.q, p.k, p.scale, p.q_labels, None, None, False, False)


# ----------------------------------------------------------------------------- GPU

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
class TestGPU:
    """The same checks, compiled, at sizes that span many tiles, bf16 included."""

    @pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
    def test_all_kernels(self, dtype):
        for labels, *mode in FWD_MODES:
            run_fwd(Problem(1000, 1537, 128, dtype, "cuda", labels=labels), *mode)
        p = Problem(1000, 1537, 128, dtype, "cuda", classes=50)
        run_pair(p, 3)
        for terms in BWD_TERMS:
            run_bwd(p, 0, True, terms, True)
        run_bwd(p, None, False, BWD_TERMS[-1], False)
        run_siglip(p, True)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("shape", [(1, 1, 3), (257, 129, 129), (300, 1001, 512)], ids=str)
    def test_feature_sizes(self, shape, dtype):
        p = Problem(*shape, dtype, "cuda")
        run_fwd(p, 0, False, True)
        run_pair(p, -1)
        run_bwd(p, 0, False, BWD_TERMS[-1], True)
        run_siglip(p, True)

    def test_low_temperature_fp16(self):
        p = Problem(1000, 1537, 128, torch.float16, "cuda", scale=100.0)
        run_fwd(p, 0, False, True)
        run_bwd(p, 0, False, BWD_TERMS[-1], True)

    def test_cuda_graph_capture(self):
        """scale is read on the device: the kernels capture and replay in a graph."""
        p = Problem(513, 700, 64, torch.float16, "cuda")
        args = (p.q_labels, p.k_labels, 0, False, True)
        expected = tri.infonce_fwd(p.q, p.k, p.scale, *args)[0].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            row_lse = tri.infonce_fwd(p.q, p.k, p.scale, *args)[0]
        p.scale.mul_(0.5)
        graph.replay()
        p.scale.mul_(2.0)
        assert not torch.allclose(row_lse, expected)
        graph.replay()
        torch.testing.assert_close(row_lse, expected, rtol=0, atol=0)


@pytest.mark.parametrize("flat_loop", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_chunks_and_loop_forms(dtype, flat_loop, monkeypatch):
    """Chunked column statistics in forward and G chunks in backward (dk summed
    over chunks) give the results of one chunk, with either loop form of the kernel."""
    from pyclloss.triton_kernels import tuning

    monkeypatch.setattr(tri, "CHUNK_ROWS", 32)
    monkeypatch.setattr(tri, "CHUNK_BYTES", 1)
    monkeypatch.setattr(tri, "COLUMN_STATS_BYTES", 1)
    monkeypatch.setattr(tuning, "CHOSEN", {})
    candidates = tri._candidates
    monkeypatch.setattr(tri, "_candidates", lambda dtype, d: [
        c for c in candidates(dtype, d) if c["FLAT_LOOP"] == flat_loop][:1])
    p = Problem(100, 45, 33, dtype, DEVICE)
    run_fwd(p, 3, False, True)
    run_pair(p, 0)
    run_bwd(p, 0, False, BWD_TERMS[-1], True)
    run_siglip(p, True)
    assert all(entry["config"]["FLAT_LOOP"] == flat_loop for entry in tuning.CHOSEN.values())


@pytest.mark.parametrize("chunk_rows", [None, 32])
def test_clip_work_is_eight_nmd(chunk_rows, monkeypatch):
    """A CLIP forward+backward does 8·N·M·D operations in all: the tiles once in
    forward (row and column statistics together), once in backward, and the two
    products with G; row chunks add nothing."""
    import pyclloss

    if chunk_rows:
        monkeypatch.setattr(tri, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(tri, "CHUNK_BYTES", 1)
        monkeypatch.setattr(tri, "COLUMN_STATS_BYTES", 1)
    flops = []
    launch, mm = tri._Tiles.launch, tri._mm_fp32

    def counting_launch(self, kernel_name, r0, r1, *args, **kwargs):
        flops.append(2 * (r1 - r0) * self.m * self.d)
        return launch(self, kernel_name, r0, r1, *args, **kwargs)

    def counting_mm(a, b, acc=None):
        flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return mm(a, b, acc)

    monkeypatch.setattr(tri._Tiles, "launch", counting_launch)
    monkeypatch.setattr(tri, "_mm_fp32", counting_mm)
    n, d = 100, 33
    img = F.normalize(torch.randn(n, d), dim=1).to(DEVICE).requires_grad_()
    txt = F.normalize(torch.randn(n, d), dim=1).to(DEVICE).requires_grad_()
    pyclloss.clip_loss(img, txt, 14.0, backend="triton").backward()
    assert sum(flops) == 8 * n * n * d


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("terms", BWD_TERMS, ids=str)
@pytest.mark.parametrize("exclude_offset,neg_only", [(0, False), (0, True), (None, False), (3, False)])
def test_self_bwd_is_dq_plus_dk(dtype, terms, exclude_offset, neg_only, monkeypatch):
    """q = k = z: the chunks of G + Gᵀ times z give the reference's dq + dk
    (row chunks included)."""
    monkeypatch.setattr(tri, "CHUNK_ROWS", 32)
    monkeypatch.setattr(tri, "CHUNK_BYTES", 1)
    p = Problem(70, 70, 33, dtype, DEVICE)
    p.k, p.k_labels = p.q, p.q_labels
    args = bwd_args(p, exclude_offset, neg_only and not terms[1], terms, True)
    dz, dscale = tri.infonce_self_bwd(p.q, p.scale, *args[:-1])
    dq, dk, want_dscale = p.ref("infonce_bwd", *args)
    grad, dot = p.logit_grad("infonce_bwd", *args)
    assert_matches(dz, (dq.double() + dk.double()).to(dz.dtype), p.rtol,
                   magnitude=(dq.double().abs() + dk.double().abs()).max().item())
    assert_matches(dscale, want_dscale, p.rtol, magnitude=(grad * dot).abs().sum().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("labels,exclude_offset,neg_only",
                         [(False, 0, False), (True, 0, False), (True, 0, True),
                          (True, None, False), (True, None, True)])
@pytest.mark.parametrize("n", [1, 37, 100])
def test_self_forward_takes_the_upper_triangle(dtype, labels, exclude_offset, neg_only, n,
                                               monkeypatch):
    """q = k: the row statistics from the upper triangle of tiles (each read by
    rows and by columns) equal the reference's, over several row chunks too."""
    monkeypatch.setattr(tri, "CHUNK_ROWS", 32)
    monkeypatch.setattr(tri, "COLUMN_STATS_BYTES", 1)
    launched = []
    launch = tri._Tiles.launch

    def spy(self, name, r0, r1, vectors, outputs, **flags):
        launched.append(flags.get("SELF_STATS", False))
        return launch(self, name, r0, r1, vectors, outputs, **flags)

    monkeypatch.setattr(tri._Tiles, "launch", spy)
    p = Problem(n, n, 33, dtype, DEVICE, labels=labels, classes=1 if n == 37 else 3)
    p.k, p.k_labels = p.q, p.q_labels
    run_fwd(p, exclude_offset, neg_only, False)
    assert launched and all(launched)


def test_self_forward_needs_one_tensor_and_symmetric_pairs():
    """Equal values in two tensors, or an exclusion off the diagonal, take the full grid."""
    p = Problem(40, 40, 16, torch.float32, DEVICE)
    assert not tri._same_rows(p.q, p.q.clone())
    assert tri._same_rows(p.q, p.q)
    run_fwd(p, 3, False, False)
