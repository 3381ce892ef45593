"""Triton kernels of the differentiable sorting networks (diffsort semantics).

A row's wires sit in a power-of-two block of N lanes. A layer is given per
lane by its partner lane and a sign (+1: the lane receives the relaxed
minimum, -1: the maximum, 0: untouched; padding lanes are untouched), so one
layer is a gather of the partner lane and elementwise arithmetic:

    d     = sign * (y[partner] - y)        (b - a of the lane's comparator)
    alpha = f(d)                           (1 on untouched lanes)
    y     = alpha * y + (1 - alpha) * y[partner]

and the same on the columns of P. Both lanes of a comparator compute the same
d bit for bit (IEEE subtraction is antisymmetric), hence the same alpha.

Kernels (semantics of pyclloss.reference.sorting):

* ``_sort_fwd_kernel``: one program per row, values and P in registers.
* ``_sort_bwd_kernel``, ``_apply_fwd_kernel``, ``_apply_bwd_kernel``: a
  persistent grid; each program walks its rows and keeps what the reverse sweep
  needs (the layer inputs, the alphas' adjoints, a chunk of P's rows at every
  layer) in its own slice of a scratch buffer, never P per layer per row.

The launchers take the arguments of the reference's functions, with the
network as its lane tables ``(partner, sign, layers, lanes)``: int32
(max(layers, 1), lanes) tensors on the rows' device, built (and cached) by
``pyclloss.ops.sorting``; and the relaxation as its code, the index in the
reference's ``DISTRIBUTIONS``.
"""

import math

import torch
import triton
import triton.language as tl


# Lanes of the largest row whose P the forward keeps in registers.
MAX_SORT_SIZE = 128
# Elements of one chunk tile (chunk rows of P × N lanes) in the backward.
_CHUNK_ELEMENTS = 1024
# Scratch budget for the persistent kernels, in elements.
_SCRATCH_ELEMENTS = 1 << 24

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

_PI = tl.constexpr(math.pi)
_TAN_PI_8 = tl.constexpr(math.tan(math.pi / 8))
_ATAN_TERMS = tl.constexpr(21)  # Taylor terms on |t| <= tan(pi/8): truncation below 1e-17
_PHI_EPS = tl.constexpr(1e-10)  # LOGISTIC_PHI_EPS of the reference (diffsort's)


@triton.jit
def _atan(x):
    # Range reduction to |t| <= tan(pi/8), then the Taylor series in t.
    ax = tl.abs(x)
    invert = ax > 1.0
    t = tl.where(invert, 1.0 / tl.where(invert, ax, 1.0), ax)
    shift = t > _TAN_PI_8
    t = tl.where(shift, (t - 1.0) / (t + 1.0), t)
    t2 = t * t
    series = tl.zeros_like(t)
    for k in tl.static_range(_ATAN_TERMS - 1, -1, -1):
        series = series * t2 + (1.0 - 2.0 * (k % 2)) / (2.0 * k + 1.0)
    r = t * series
    r = tl.where(shift, r + _PI / 4, r)
    r = tl.where(invert, _PI / 2 - r, r)
    return tl.where(x < 0, -r, r)


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _relax(d, steepness, art_lambda, DIST: tl.constexpr):
    """alpha = f(d) and d alpha / d d (codes: DISTRIBUTIONS)."""
    v = steepness * d
    if DIST == 0:  # logistic
        alpha = _sigmoid(v)
        grad = steepness * alpha * (1.0 - alpha)
    elif DIST == 1:  # logistic_phi
        r = tl.abs(d) + _PHI_EPS
        scale = tl.exp(-art_lambda * tl.log(r))
        alpha = _sigmoid(v * scale)
        grad = alpha * (1.0 - alpha) * steepness * scale * (1.0 - art_lambda * tl.abs(d) / r)
    elif DIST == 2:  # gaussian
        alpha = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
        grad = steepness * tl.exp(-0.5 * v * v) * 0.3989422804014327
    elif DIST == 3:  # cauchy
        alpha = _atan(v) / _PI + 0.5
        grad = steepness / (_PI * (1.0 + v * v))
    elif DIST == 4:  # reciprocal
        den = 2.0 + tl.abs(v)
        alpha = 0.5 * (v / den + 1.0)
        grad = steepness / (den * den)
    else:  # optimal
        tail = tl.abs(v) > 0.25
        v_tail = tl.where(tail, v, 1.0)
        alpha = tl.where(tail, (v_tail > 0).to(v.dtype) - 1.0 / (16.0 * v_tail), v + 0.5)
        grad = tl.where(tail, steepness / (16.0 * v_tail * v_tail), steepness)
    return alpha, grad


@triton.jit
def _layer(partner_ptr, sign_ptr, layer, lanes, N: tl.constexpr):
    partner = tl.load(partner_ptr + layer * N + lanes)
    sign = tl.load(sign_ptr + layer * N + lanes)
    return partner, sign


@triton.jit
def _alpha(y, y_partner, sign, steepness, art_lambda, DIST: tl.constexpr):
    """(alpha, d alpha / d(b - a)) of every lane; alpha = 1 on untouched lanes."""
    d = sign.to(y.dtype) * (y_partner - y)
    alpha, grad = _relax(d, steepness, art_lambda, DIST)
    return tl.where(sign != 0, alpha, 1.0), grad


@triton.jit
def _gather_cols(t, partner, ROWS: tl.constexpr, N: tl.constexpr):
    return tl.gather(t, tl.broadcast_to(partner[None, :], (ROWS, N)), 1)


@triton.jit
def _sort_fwd_kernel(x_ptr, sorted_ptr, perm_ptr, partner_ptr, sign_ptr, n, layers, params_ptr,
                     DIST: tl.constexpr, ACC: tl.constexpr, N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, N)
    live = lanes < n
    steepness = tl.load(params_ptr)
    art_lambda = tl.load(params_ptr + 1)
    y = tl.load(x_ptr + row * n + lanes, mask=live, other=0.0).to(ACC)
    perm = (lanes[:, None] == lanes[None, :]).to(ACC)  # rows = inputs, lanes = wires
    for layer in range(layers):
        partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
        y_partner = tl.gather(y, partner, 0)
        alpha, _ = _alpha(y, y_partner, sign, steepness, art_lambda, DIST)
        y = alpha * y + (1.0 - alpha) * y_partner
        perm_partner = _gather_cols(perm, partner, N, N)
        perm = alpha[None, :] * perm + (1.0 - alpha[None, :]) * perm_partner
    tl.store(sorted_ptr + row * n + lanes, y.to(sorted_ptr.dtype.element_ty), mask=live)
    offs = row * n * n + lanes[:, None] * n + lanes[None, :]
    tl.store(perm_ptr + offs, perm.to(perm_ptr.dtype.element_ty), mask=live[:, None] & live[None, :])


@triton.jit
def _sort_bwd_kernel(x_ptr, grad_sorted_ptr, grad_perm_ptr, grad_x_ptr, partner_ptr, sign_ptr,
                     scratch_ptr, rows, n, layers, params_ptr,
                     HAS_GRAD_SORTED: tl.constexpr, HAS_GRAD_PERM: tl.constexpr,
                     DIST: tl.constexpr, ACC: tl.constexpr, N: tl.constexpr,
                     CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 row indices in the persistent loop
    lanes = tl.arange(0, N)
    live = lanes < n
    steepness = tl.load(params_ptr)
    art_lambda = tl.load(params_ptr + 1)
    k = tl.arange(0, CHUNK)
    chunk_offs = k[:, None] * N + lanes[None, :]
    # This program's scratch: layer inputs, alpha adjoints, a chunk of P's rows per layer.
    values = scratch_ptr + pid * layers * N * (2 + CHUNK)
    grad_alpha = values + layers * N
    perm_diff = grad_alpha + layers * N
    for row in range(pid, rows, tl.num_programs(0)):
        base = row * n
        tl.debug_barrier()
        y = tl.load(x_ptr + base + lanes, mask=live, other=0.0).to(ACC)
        for layer in range(layers):
            partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
            tl.store(values + layer * N + lanes, y)
            tl.store(grad_alpha + layer * N + lanes, tl.zeros_like(y))
            y_partner = tl.gather(y, partner, 0)
            alpha, _ = _alpha(y, y_partner, sign, steepness, art_lambda, DIST)
            y = alpha * y + (1.0 - alpha) * y_partner
        tl.debug_barrier()

        if HAS_GRAD_PERM:
            # P's rows r0 .. r0 + CHUNK: the identity pushed forwards (kept per
            # layer as lane - partner differences), then dP pushed backwards.
            for r0 in range(0, n, CHUNK):
                p = ((r0 + k)[:, None] == lanes[None, :]).to(ACC)
                for layer in range(layers):
                    partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
                    y_in = tl.load(values + layer * N + lanes)
                    alpha, _ = _alpha(y_in, tl.gather(y_in, partner, 0), sign, steepness,
                                      art_lambda, DIST)
                    p_partner = _gather_cols(p, partner, CHUNK, N)
                    tl.store(perm_diff + layer * CHUNK * N + chunk_offs, p - p_partner)
                    p = alpha[None, :] * p + (1.0 - alpha[None, :]) * p_partner
                tl.debug_barrier()
                rows_live = (r0 + k)[:, None] < n
                g = tl.load(grad_perm_ptr + base * n + (r0 + k)[:, None] * n + lanes[None, :],
                            mask=rows_live & live[None, :], other=0.0).to(ACC)
                for step in range(layers):
                    layer = layers - 1 - step
                    partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
                    y_in = tl.load(values + layer * N + lanes)
                    alpha, _ = _alpha(y_in, tl.gather(y_in, partner, 0), sign, steepness,
                                      art_lambda, DIST)
                    g_partner = _gather_cols(g, partner, CHUNK, N)
                    diff = tl.load(perm_diff + layer * CHUNK * N + chunk_offs)
                    acc = tl.load(grad_alpha + layer * N + lanes)
                    tl.store(grad_alpha + layer * N + lanes, acc + tl.sum(diff * (g - g_partner), 0))
                    g = alpha[None, :] * g + (1.0 - alpha[None, :]) * g_partner
                tl.debug_barrier()

        if HAS_GRAD_SORTED:
            g = tl.load(grad_sorted_ptr + base + lanes, mask=live, other=0.0).to(ACC)
        else:
            g = tl.zeros([N], dtype=ACC)
        for step in range(layers):
            layer = layers - 1 - step
            partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
            y_in = tl.load(values + layer * N + lanes)
            y_partner = tl.gather(y_in, partner, 0)
            alpha, dalpha = _alpha(y_in, y_partner, sign, steepness, art_lambda, DIST)
            g_partner = tl.gather(g, partner, 0)
            adj = tl.load(grad_alpha + layer * N + lanes) + (y_in - y_partner) * (g - g_partner)
            g = alpha * g + (1.0 - alpha) * g_partner - sign.to(ACC) * adj * dalpha
        tl.store(grad_x_ptr + base + lanes, g.to(grad_x_ptr.dtype.element_ty), mask=live)


@triton.jit
def _apply_fwd_kernel(x_ptr, v_ptr, out_ptr, partner_ptr, sign_ptr, scratch_ptr, rows, n, layers,
                      params_ptr,
                      DIST: tl.constexpr, ACC: tl.constexpr, N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 row indices in the persistent loop
    lanes = tl.arange(0, N)
    live = lanes < n
    steepness = tl.load(params_ptr)
    art_lambda = tl.load(params_ptr + 1)
    alphas = scratch_ptr + pid * layers * N
    for row in range(pid, rows, tl.num_programs(0)):
        base = row * n
        tl.debug_barrier()
        y = tl.load(x_ptr + base + lanes, mask=live, other=0.0).to(ACC)
        for layer in range(layers):
            partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
            y_partner = tl.gather(y, partner, 0)
            alpha, _ = _alpha(y, y_partner, sign, steepness, art_lambda, DIST)
            tl.store(alphas + layer * N + lanes, alpha)
            y = alpha * y + (1.0 - alpha) * y_partner
        tl.debug_barrier()
        # P v = M_1 (M_2 (... (M_L v))): the layers backwards on v.
        w = tl.load(v_ptr + base + lanes, mask=live, other=0.0).to(ACC)
        for step in range(layers):
            layer = layers - 1 - step
            partner = tl.load(partner_ptr + layer * N + lanes)
            alpha = tl.load(alphas + layer * N + lanes)
            w = alpha * w + (1.0 - alpha) * tl.gather(w, partner, 0)
        tl.store(out_ptr + base + lanes, w.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _apply_bwd_kernel(x_ptr, v_ptr, grad_out_ptr, grad_x_ptr, grad_v_ptr, partner_ptr, sign_ptr,
                      scratch_ptr, rows, n, layers, params_ptr,
                      DIST: tl.constexpr, ACC: tl.constexpr, N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 row indices in the persistent loop
    lanes = tl.arange(0, N)
    live = lanes < n
    steepness = tl.load(params_ptr)
    art_lambda = tl.load(params_ptr + 1)
    values = scratch_ptr + pid * layers * N * 2
    u_diff = values + layers * N
    for row in range(pid, rows, tl.num_programs(0)):
        base = row * n
        tl.debug_barrier()
        # With dP = g vᵀ the adjoint of a comparator's alpha is
        # (u_lo - u_hi)(w_lo - w_hi), u = gᵀ·(layers before) forwards,
        # w = (layers after)·v backwards; u at the end is Pᵀ g = d v.
        y = tl.load(x_ptr + base + lanes, mask=live, other=0.0).to(ACC)
        u = tl.load(grad_out_ptr + base + lanes, mask=live, other=0.0).to(ACC)
        for layer in range(layers):
            partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
            tl.store(values + layer * N + lanes, y)
            y_partner = tl.gather(y, partner, 0)
            alpha, _ = _alpha(y, y_partner, sign, steepness, art_lambda, DIST)
            y = alpha * y + (1.0 - alpha) * y_partner
            u_partner = tl.gather(u, partner, 0)
            tl.store(u_diff + layer * N + lanes, u - u_partner)
            u = alpha * u + (1.0 - alpha) * u_partner
        tl.store(grad_v_ptr + base + lanes, u.to(grad_v_ptr.dtype.element_ty), mask=live)
        tl.debug_barrier()
        w = tl.load(v_ptr + base + lanes, mask=live, other=0.0).to(ACC)
        g = tl.zeros([N], dtype=ACC)
        for step in range(layers):
            layer = layers - 1 - step
            partner, sign = _layer(partner_ptr, sign_ptr, layer, lanes, N)
            y_in = tl.load(values + layer * N + lanes)
            y_partner = tl.gather(y_in, partner, 0)
            alpha, dalpha = _alpha(y_in, y_partner, sign, steepness, art_lambda, DIST)
            w_partner = tl.gather(w, partner, 0)
            g_partner = tl.gather(g, partner, 0)
            adj = tl.load(u_diff + layer * N + lanes) * (w - w_partner) \
                + (y_in - y_partner) * (g - g_partner)
            w = alpha * w + (1.0 - alpha) * w_partner
            g = alpha * g + (1.0 - alpha) * g_partner - sign.to(ACC) * adj * dalpha
        tl.store(grad_x_ptr + base + lanes, g.to(grad_x_ptr.dtype.element_ty), mask=live)


# --------------------------------------------------------------------- launchers


def _num_warps(elements: int) -> int:
    return max(1, min(8, elements // 512))


def _programs(rows: int, per_program: int, device: torch.device) -> int:
    if device.type == "cuda":
        wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another
        wanted = 4
    budget = max(1, _SCRATCH_ELEMENTS // max(per_program, 1))
    return max(1, min(rows, wanted, budget))


def _acc(x: torch.Tensor):
    """The comparator arithmetic's dtype (float64 for float64 rows, else float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return dtype, _TL_DTYPE[dtype]


def _relax_args(x, distribution: int, steepness: float, art_lambda: float):
    # steepness and art_lambda travel as a tensor so that float64 math gets them in float64.
    params = torch.tensor([steepness, art_lambda], dtype=_acc(x)[0], device=x.device)
    return {"params_ptr": params, "DIST": distribution}


def sort_forward(x, network, steepness, distribution, art_lambda):
    rows, n = x.shape
    if n > MAX_SORT_SIZE:
        raise ValueError(f"the triton diff_sort keeps P in registers: n must be <= {MAX_SORT_SIZE}, got {n}")
    x = x.contiguous()
    partner, sign, layers, lanes = network
    sorted_x = torch.empty_like(x)
    perm = torch.empty(rows, n, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return sorted_x, perm
    _sort_fwd_kernel[(rows,)](x, sorted_x, perm, partner, sign, n, layers,
                              ACC=_acc(x)[1], N=lanes, num_warps=_num_warps(lanes * lanes),
                              **_relax_args(x, distribution, steepness, art_lambda))
    return sorted_x, perm


def sort_backward(x, grad_sorted, grad_perm, network, steepness, distribution, art_lambda):
    rows, n = x.shape
    x = x.contiguous()
    grad_x = torch.empty_like(x)
    if rows == 0:
        return grad_x
    partner, sign, layers, lanes = network
    chunk = max(1, min(lanes, _CHUNK_ELEMENTS // lanes))
    per_program = layers * lanes * (2 + chunk)
    programs = _programs(rows, per_program, x.device)
    acc_dtype, acc = _acc(x)
    scratch = torch.empty(programs * per_program, dtype=acc_dtype, device=x.device)
    has_gs, has_gp = grad_sorted is not None, grad_perm is not None
    _sort_bwd_kernel[(programs,)](
        x, grad_sorted.contiguous() if has_gs else x, grad_perm.contiguous() if has_gp else x,
        grad_x, partner, sign, scratch, rows, n, layers,
        HAS_GRAD_SORTED=has_gs, HAS_GRAD_PERM=has_gp, ACC=acc, N=lanes, CHUNK=chunk,
        num_warps=_num_warps(chunk * lanes), **_relax_args(x, distribution, steepness, art_lambda))
    return grad_x


def apply_forward(x, v, network, steepness, distribution, art_lambda):
    rows, n = x.shape
    x, v = x.contiguous(), v.contiguous()
    out = torch.empty_like(x)
    if rows == 0:
        return out
    partner, sign, layers, lanes = network
    per_program = layers * lanes
    programs = _programs(rows, per_program, x.device)
    acc_dtype, acc = _acc(x)
    scratch = torch.empty(programs * per_program, dtype=acc_dtype, device=x.device)
    _apply_fwd_kernel[(programs,)](x, v, out, partner, sign, scratch, rows, n, layers,
                                   ACC=acc, N=lanes, num_warps=_num_warps(lanes),
                                   **_relax_args(x, distribution, steepness, art_lambda))
    return out


def apply_backward(x, v, grad_out, network, steepness, distribution, art_lambda):
    rows, n = x.shape
    x, v, grad_out = x.contiguous(), v.contiguous(), grad_out.contiguous()
    grad_x, grad_v = torch.empty_like(x), torch.empty_like(v)
    if rows == 0:
        return grad_x, grad_v
    partner, sign, layers, lanes = network
    per_program = 2 * layers * lanes
    programs = _programs(rows, per_program, x.device)
    acc_dtype, acc = _acc(x)
    scratch = torch.empty(programs * per_program, dtype=acc_dtype, device=x.device)
    _apply_bwd_kernel[(programs,)](x, v, grad_out, grad_x, grad_v, partner, sign, scratch,
                                   rows, n, layers, ACC=acc, N=lanes, num_warps=_num_warps(lanes),
                                   **_relax_args(x, distribution, steepness, art_lambda))
    return grad_x, grad_v
