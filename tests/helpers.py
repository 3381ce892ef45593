"""What the test files share: the backends to test here, comparisons against
the float64 reference, the multi-process launcher, and oracles that more than
one file checks against. (conftest.py holds only fixtures and markers.)"""

import os
import socket

import pytest
import torch

# Triton runs on CPU tensors only through its interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pyclloss.backends import backends  # noqa: E402
from pyclloss.tools import peers  # noqa: E402
from pyclloss.reference import info_nce as ref_info_nce  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def env_without_interpreter(**extra):
    """This process's environment, less the interpreter choice above, plus
    ``extra``: for a subprocess that compiles Triton kernels for a GPU or picks
    its own mode (a script's --dry-run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def fused_backends(device: str):
    """The fused backends that run on ``device`` here."""
    names = ("cuda", "triton") if device == "cuda" else ("cpp", "triton")
    return [n for n in names if backends()[n].available]


def skip_unfaithful(backend, dtype):
    """Skips what the Triton kernels do not run here: float64 (their statistics
    are float32) and bf16 (the interpreter's is not faithful; a GPU tests it)."""
    if backend == "triton" and dtype in (torch.float64, torch.bfloat16):
        pytest.skip("Triton: float32 statistics; bf16 is tested on a GPU (the interpreter's "
                    "bf16 is not faithful)")


def peer_or_skip(loader):
    """A peer's code from ``loader`` (one of pyclloss.tools.peers), or the test
    skipped with the reason it is not here."""
    try:
        return loader()
    except peers.PeerUnavailable as exc:
        pytest.skip(str(exc))


# ------------------------------------------------------------- random inputs


def unit_rows(n, d, dtype=torch.float32, device="cpu"):
    """``n`` random unit rows of size ``d``: normalised in float64, then rounded."""
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    return x.to(device, dtype).contiguous()


def random_labels(n, classes, device="cpu"):
    return torch.randint(0, classes, (n,)).to(device)


def near_copies(rows, m, noise=1e-3):
    """``m`` unit rows, each within about ``noise`` of one of ``rows`` (cycled):
    near-duplicates, the hard input of low temperatures."""
    base = rows.double()[torch.arange(m) % rows.shape[0]]
    near = base + noise * torch.randn(base.shape, dtype=torch.float64).to(base.device)
    return torch.nn.functional.normalize(near, dim=1).to(rows.dtype).contiguous()


# ------------------------------------------------- the one tolerance rule
#
# A result in dtype X is compared with the reference run in float64 on the same
# input values (the oracle). Its largest error may be at most twice the largest
# error of the reference itself run on the inputs in X (PyTorch's own error in
# that dtype; flash-attention's tests use this rule), plus a floor of FLOOR_ULPS
# units in the last place at the result's magnitude, for results the reference
# happens to compute exactly. The unit is that of the dtype the result was
# carried in: a kernel's output dtype; a loss's input dtype (the losses hand
# their kernels intermediates rounded to it). The magnitude is the largest
# |oracle| unless a caller knows the size of the terms a result sums. float64
# has no wider oracle: PyTorch's own error there is its float32 error scaled by
# the ratio of the two epsilons (rounding errors scale with the unit roundoff).

FLOOR_ULPS = 8
_FLOAT64_PER_FLOAT32 = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps


def _cast(values, dtype):
    """Floating-point tensors of ``values`` in ``dtype``; everything else as it is."""
    return [v.detach().to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for v in values]


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_error(actual, oracle):
    """max |actual - oracle| over the oracle's finite entries."""
    actual, oracle = actual.detach().cpu().double(), oracle.detach().cpu().double()
    finite = torch.isfinite(oracle)
    return (actual[finite] - oracle[finite]).abs().max().item() if finite.any() else 0.0


def _own_error(actual, oracle):
    """_max_error over the entries PyTorch computed finite: where it overflows
    (1/|z| of a tiny float16 row, say) it shows nothing of its rounding."""
    actual = actual.detach().cpu()
    finite = torch.isfinite(actual)
    return _max_error(actual[finite], oracle.detach().cpu()[finite])


def own_errors(fn, args):
    """The oracle ``fn`` on float64 copies of ``args``, and per output PyTorch's
    own error: ``fn`` on ``args`` as they are against the oracle."""
    oracle = _as_tuple(fn(*_cast(args, torch.float64)))
    if {a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point()} != {torch.float64}:
        return oracle, [_own_error(a, o) for a, o in zip(_as_tuple(fn(*args)), oracle)]
    low = _cast(args, torch.float32)
    errors = map(_own_error, _as_tuple(fn(*low)), _as_tuple(fn(*_cast(low, torch.float64))))
    return oracle, [_FLOAT64_PER_FLOAT32 * e for e in errors]


def assert_within(actual, oracle, own_error, what, magnitude=None, precision=None):
    """max |actual - oracle| <= 2 own_error + FLOOR_ULPS eps(precision) magnitude,
    with the oracle's infinities exactly and never a NaN. ``magnitude``: the size
    of the terms the result sums when they cancel (default: the largest |oracle|);
    ``precision``: the dtype the result was carried in (default: its own)."""
    assert actual.shape == oracle.shape, f"{what}: shapes {actual.shape} != {oracle.shape}"
    a, o = actual.detach().cpu().double(), oracle.detach().cpu().double()
    assert not torch.isnan(a).any(), f"{what}: NaN"
    finite = torch.isfinite(o)
    assert torch.equal(a[~finite], o[~finite]), f"{what}: infinities differ"
    if magnitude is None:
        magnitude = o[finite].abs().max().item() if finite.any() else 0.0
    eps = torch.finfo(precision or actual.dtype).eps
    err = _max_error(a, o)
    bound = 2 * own_error + FLOOR_ULPS * eps * magnitude
    assert err <= bound, (f"{what}: max error {err:.3e} > {bound:.3e} (own error of the "
                          f"reference {own_error:.3e}, magnitude {magnitude:.3e})")


def check_outputs(outputs, fn, args, what, magnitudes=None, precision=None):
    """Each of ``outputs`` (a kernel's results on ``args``) against the reference
    ``fn`` by the rule; ``magnitudes`` maps an output's index to its magnitude."""
    oracle, errors = own_errors(fn, args)
    outputs = _as_tuple(outputs)
    assert len(outputs) == len(oracle)
    for i, (a, o, e) in enumerate(zip(outputs, oracle, errors)):
        assert_within(a, o, e, f"{what} output {i}", (magnitudes or {}).get(i), precision)
    return oracle


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def assert_close_rel(actual, expected, tol, what):
    """max |a - e| <= tol * max(1, max |e|), with NaN never passing: for results
    that must agree to a stated precision, not for rounding (see assert_within)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = tol * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def assert_same_value_and_grad(expected_fn, actual_fn, x, tol):
    """Two computations of one loss on copies of ``x``: values and gradients within ``tol``."""
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, actual = expected_fn(a), actual_fn(b)
    assert_close_rel(actual, expected, tol, "value")
    expected.backward()
    actual.backward()
    assert_close_rel(b.grad, a.grad, tol, "grad")


def check_against_reference(fused_fn, ref_fn, inputs, dtype, what, grad_magnitudes=None,
                            loss_magnitude=None):
    """Loss and gradients (of the floating inputs that get one) of ``fused_fn`` on
    ``inputs`` in ``dtype`` (0-dim ones stay as given) against ``ref_fn`` by the rule.
    ``grad_magnitudes(probe)``: where a loss knows the terms its gradients sum,
    their sizes for the output's cotangent ``probe`` ({index of the input: size});
    ``loss_magnitude``: likewise the size of the terms the loss sums."""
    fused_in = [x.to(dtype) if x.is_floating_point() and x.dim() > 0 else x for x in inputs]
    leaves = [_leaf(x) if x.is_floating_point() else x for x in fused_in]
    out = fused_fn(*leaves)
    probe = torch.randn(out.shape, dtype=torch.float64).to(out.device)
    (out.double() * probe).sum().backward()
    with_grad = [i for i, x in enumerate(leaves) if x.is_floating_point() and x.grad is not None]
    got = (out, *[leaves[i].grad for i in with_grad])

    def reference(*values):
        leaves = [_leaf(x) if x.is_floating_point() else x for x in values]
        value = ref_fn(*leaves)
        (value.double() * probe).sum().backward()
        assert all(leaves[i].grad is not None for i in with_grad), f"{what}: reference grads"
        return (value, *[leaves[i].grad for i in with_grad])

    # Losses of unit rows are of order one: magnitudes of at least 1. A 0-dim
    # input's gradient sums terms over the whole batch that largely cancel;
    # without the terms at hand, their size is taken as 10x the sum's.
    magnitudes = {i: max(1.0, g.abs().max().item()) * (10 if i and g.dim() == 0 else 1)
                  for i, g in enumerate(got)}
    if loss_magnitude is not None:
        magnitudes[0] = max(magnitudes[0], loss_magnitude)
    for i, size in (grad_magnitudes(probe) if grad_magnitudes else {}).items():
        out = 1 + with_grad.index(i)  # gradients follow the loss in ``got``
        magnitudes[out] = max(magnitudes[out], size)
    # The losses hand their kernels intermediates (unit rows) rounded to dtype.
    check_outputs(got, reference, fused_in, what, magnitudes, precision=dtype)


# ------------------------------------------------------------- several processes

SPAWN_TIMEOUT_S = 150


def _worker(rank, world, port, out_dir, on_gpu, body, args):
    """One rank: joins the group, saves what ``body(rank, device, *args)`` returns."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world)
    try:
        torch.save(body(rank, device, *args), os.path.join(out_dir, f"rank{rank}.pt"))
        # no rank tears its group down while another still has messages in
        # flight for it (gloo then aborted a rank under load)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is saved and the group is down: leave without the interpreter's
    # teardown, where a gloo thread still winding down once aborted a rank
    # under load ("terminate called without an active exception").
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, out_dir: str, body, *args, on_gpu: bool = False):
    """Run ``body(rank, device, *args)`` on every rank; a hang or a failed rank
    fails the test instead of blocking."""
    ctx = mp.get_context("spawn")
    # a fixed mmap threshold: glibc hands large buffers back, so RSS follows live memory
    env_before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    try:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, world, port, out_dir, on_gpu, body, args))
                 for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = env_before
    for p in procs:
        p.join(SPAWN_TIMEOUT_S)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} did not finish within {SPAWN_TIMEOUT_S} s"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"worker exit codes {codes}"
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


# ------------------------------------------------------------------- oracles


def authors_rnc(features, labels, tau):
    """The authors' RnCLoss: features (B, 2, D), labels (B, L); a loop over the
    positive column with an (n, n−1) mask each."""
    f = torch.cat([features[:, 0], features[:, 1]], dim=0)
    y = labels.repeat(2, 1)
    n = f.shape[0]
    d = (y[:, None, :] - y[None, :, :]).abs().sum(-1)
    logits = -(f[:, None, :] - f[None, :, :]).norm(2, dim=-1) / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    off = ~torch.eye(n, dtype=torch.bool)
    logits, exp_logits, d = (x[off].view(n, n - 1) for x in (logits, logits.exp(), d))
    loss = 0.0
    for k in range(n - 1):
        in_set = (d >= d[:, k:k + 1]).to(logits.dtype)
        loss = loss - (logits[:, k] - (in_set * exp_logits).sum(1).log()).sum() / (n * (n - 1))
    return loss


def infonce_pair_fwd_oracle(q, k, scale, q_labels, k_labels, exclude_offset, neg_lse):
    """The reference's pair forward with the tail PyTorch's softplus leaves out
    added back: F.softplus returns x above 20, an error of up to e^-20 per term,
    far above float64 rounding (the C++ float64 kernel computes it)."""
    loss_sum, sigmoid_sum = ref_info_nce.infonce_pair_fwd(
        q, k, scale, q_labels, k_labels, exclude_offset, neg_lse)
    _, pos, _ = ref_info_nce._masks(q, k, q_labels, k_labels, exclude_offset, False)
    arg = neg_lse[:, None] - ref_info_nce._logits(q, k, scale)[1]
    tail = torch.log1p(torch.exp(-arg.clamp_min(20)))
    tail = torch.where(pos & (arg > 20), tail, torch.zeros_like(tail)).sum(1)
    return loss_sum + tail, sigmoid_sum


def absolute_coefficients(row_lse, row_coef, col_lse, col_coef, pos_coef, pair_lse):
    """infonce_bwd's statistics and coefficients, the coefficients made |c|. Every
    term of G (docs/fused_core.md) is a coefficient times a weight >= 0 (a
    probability or a sigmoid), so the G they give is the sum of the sizes of
    its terms: G's rounding scales with that, not with |G|, which is far
    smaller where the terms cancel."""
    size = lambda c: None if c is None else c.abs()
    return row_lse, size(row_coef), col_lse, size(col_coef), size(pos_coef), pair_lse


def infonce_self_bwd_oracle(z, scale, *args):
    """infonce_self_bwd (q = k = z) by the reference: dq + dk, and dscale."""
    dq, dk, dscale = ref_info_nce.infonce_bwd(z, z, scale, *args, True)
    return (dq.to(torch.float64) + dk.to(torch.float64)).to(z.dtype), dscale
