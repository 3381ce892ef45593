"""What the test files share: the backends to test here, comparisons against
the float64 reference, the multi-process launcher, and oracles that more than
one file checks against. (conftest.py holds only fixtures and markers.)"""

import os
import socket

import torch

# Triton runs on CPU tensors only through its interpreter, which must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pyclloss.backends import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def fused_backends(device: str):
    """The fused backends that run on ``device`` here."""
    names = ("cuda", "triton") if device == "cuda" else ("cpp", "triton")
    return [n for n in names if backends()[n].available]


# ------------------------------------------------------- against the reference

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def assert_close_rel(actual, expected, tol, what):
    """max |a - e| <= tol * max(1, max |e|), with NaN never passing."""
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


def check_against_reference(fused_fn, ref_fn, inputs, dtype, what):
    """Loss and gradients of ``fused_fn`` (inputs in ``dtype``) against ``ref_fn``
    on the same values in float64."""
    fused_in = [_leaf(x.to(dtype) if x.is_floating_point() and x.dim() > 0 else x) for x in inputs]
    ref_in = [_leaf(x.detach().double()) if x.is_floating_point() else x for x in fused_in]
    fused_in = [x if x.is_floating_point() else x.detach() for x in fused_in]
    ref_in = [x if x.is_floating_point() else x.detach() for x in ref_in]
    out, expected = fused_fn(*fused_in), ref_fn(*ref_in)
    tol = TOL[dtype]
    assert_close_rel(out, expected, tol, f"{what} value")
    probe = torch.randn_like(expected)
    (out.double() * probe).sum().backward()
    (expected * probe).sum().backward()
    for i, (a, e) in enumerate(zip(fused_in, ref_in)):
        if a.is_floating_point() and a.grad is not None:
            assert e.grad is not None
            assert_close_rel(a.grad, e.grad, tol * 10 if dtype != torch.float64 and a.dim() == 0
                             else tol, f"{what} grad of input {i}")


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
