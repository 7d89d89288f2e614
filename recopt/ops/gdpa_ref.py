"""Plain-PyTorch reference of GDPA (generalized dot-product attention).

This is what the op runs where no fast kernel applies (CPU, or triton not
installed) and what every kernel is tested against. Semantics,
per sample b, head h, query row i and key row j::

    s_ij = pre_scale * <q_i, k_j> + bias[b,h,i,j]   # fp32; bias optional, broadcast
    s_ij = 0   if j >= kv_len[b] or (window >= 0 and |i - j| > window)
                  or (causal and j > i)
    p_ij = act(s_ij) * qk_scale                     # no row normalisation
    o_i  = sum_j cast(p_ij, v.dtype) * v_j          # rows i >= q_len[b] are 0

Masked scores are set to **zero**, not -inf: this is exact because every
supported activation has act(0) == 0, so a row whose keys are all masked
gives 0. ``causal`` keeps ``j <= i`` (top-left aligned, as
``F.scaled_dot_product_attention(is_causal=True)``). ``"softmax"`` normalises
rows and masks with -inf; a row with no kept key returns what
``masked_rows`` says (see :func:`softmax_attention`).

Shapes: dense ``q [B, H, Tq, d]``, ``k [B, Hkv, Tk, d]``, ``v [B, Hkv, Tk, dv]``
with ``H % Hkv == 0`` (GQA); jagged tensors are ``values [sum T_b, H, d]`` with
``offsets int[B + 1]`` and are handled by padding (:func:`jagged_to_padded`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

# Activation names. The integer is the kernel's constexpr code (kept stable).
ACTIVATIONS = {
    "raw": 0,          # identity
    "gelu": 1,         # exact (erf) GELU
    "gelu_tanh": 2,    # tanh approximation ("fast_gelu" in Meta's kernels)
    "silu": 3,
    "relu": 4,
    "relu_square": 5,  # relu(x)**2
    "leaky_relu": 6,   # negative slope 0.01
    "hardswish": 7,
}
ALIASES = {
    "identity": "raw", "none": "raw", "linear": "raw",
    "gelu_approx": "gelu_tanh", "fast_gelu": "gelu_tanh", "gelu_erf": "gelu",
    "swish": "silu", "relu2": "relu_square", "relu_squared": "relu_square",
    "squared_relu": "relu_square",
}
SOFTMAX = "softmax"
LEAKY_SLOPE = 0.01
# Activations with act(c*x) == c*act(x) for c > 0: a pre-activation scale may
# be moved after the activation for these only.
POSITIVELY_HOMOGENEOUS = frozenset({"raw", "relu", "leaky_relu"})


def canonical_activation(name: str) -> str:
    """The canonical activation name; a clear error lists the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"activation must be a string, got {type(name).__name__}")
    key = name.lower()
    key = ALIASES.get(key, key)
    if key in ACTIVATIONS or key == SOFTMAX:
        return key
    raise ValueError(
        f"unknown GDPA activation {name!r}; valid: {sorted(ACTIVATIONS) + [SOFTMAX]} "
        f"(aliases: {sorted(ALIASES)})"
    )


def act_fwd(s: torch.Tensor, act: str) -> torch.Tensor:
    """act(s) elementwise, same formulas as the Triton kernel."""
    if act == "raw":
        return s
    if act == "gelu":
        return F.gelu(s)
    if act == "gelu_tanh":
        return F.gelu(s, approximate="tanh")
    if act == "silu":
        return F.silu(s)
    if act == "relu":
        return F.relu(s)
    if act == "relu_square":
        return F.relu(s).square()
    if act == "leaky_relu":
        return F.leaky_relu(s, LEAKY_SLOPE)
    if act == "hardswish":
        return F.hardswish(s)
    raise ValueError(f"act_fwd: unsupported activation {act!r}")


def act_grad(s: torch.Tensor, act: str) -> torch.Tensor:
    """d act(s) / ds elementwise (used by the reference backward)."""
    if act == "raw":
        return torch.ones_like(s)
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(s * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * s * s) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + s * pdf
    if act == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (s + 0.044715 * s * s * s))
        return 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * s * s)
    if act == "silu":
        sig = torch.sigmoid(s)
        return sig * (1.0 + s * (1.0 - sig))
    if act == "relu":
        return (s > 0).to(s.dtype)
    if act == "relu_square":
        return 2.0 * F.relu(s)
    if act == "leaky_relu":
        return torch.where(s > 0, torch.ones_like(s), torch.full_like(s, LEAKY_SLOPE))
    if act == "hardswish":
        mid = (2.0 * s + 3.0) / 6.0
        return torch.where(s <= -3.0, torch.zeros_like(s), torch.where(s >= 3.0, torch.ones_like(s), mid))
    raise ValueError(f"act_grad: unsupported activation {act!r}")


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: fp32, or fp64 for fp64 inputs."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _expand_kv_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    hkv = t.shape[1]
    if hkv == heads:
        return t
    if heads % hkv:
        raise ValueError(f"GQA needs H % Hkv == 0, got H={heads}, Hkv={hkv}")
    return t.repeat_interleave(heads // hkv, dim=1)


def _keep_mask(B, Tq, Tk, q_lengths, kv_lengths, window, device, causal=False):
    """[B|1, 1, Tq, Tk] bool: which scores are kept (None = all)."""
    keep = None
    i = torch.arange(Tq, device=device)[:, None]
    j = torch.arange(Tk, device=device)[None, :]
    if window is not None and window >= 0:
        keep = ((i - j).abs() <= window)[None, None]
    if causal:
        c = (j <= i)[None, None]
        keep = c if keep is None else keep & c
    if kv_lengths is not None:
        j = torch.arange(Tk, device=device)
        kl = (j[None, :] < kv_lengths.to(device).view(-1, 1))[:, None, None, :]
        keep = kl if keep is None else keep & kl
    return keep


def _q_row_mask(Tq, q_lengths, device):
    """[B, 1, Tq, 1] bool of valid query rows, or None."""
    if q_lengths is None:
        return None
    i = torch.arange(Tq, device=device)
    return (i[None, :] < q_lengths.to(device).view(-1, 1))[:, None, :, None]


def gdpa_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lengths: Optional[torch.Tensor] = None,
    kv_lengths: Optional[torch.Tensor] = None,
    activation: str = "raw",
    qk_scale: float = 1.0,
    pre_scale: float = 1.0,
    window: int = -1,
    causal: bool = False,
    bias: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense GDPA forward: ``q [B,H,Tq,d]``, ``k [B,Hkv,Tk,d]``, ``v [B,Hkv,Tk,dv]`` → ``[B,H,Tq,dv]``.

    ``bias`` (additive, broadcastable to ``[B,H,Tq,Tk]``) is added to the
    scaled scores before masking and the activation. ``dropout_p > 0`` drops
    activated scores (probabilities for softmax) as ``F.dropout`` in training. Differentiable with plain
    autograd (tests use that to check the explicit backward). Output dtype is
    ``q.dtype``.
    """
    act = canonical_activation(activation)
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    k = _expand_kv_heads(k, H)
    v = _expand_kv_heads(v, H)
    keep = _keep_mask(B, Tq, Tk, q_lengths, kv_lengths, window, q.device, causal)
    rows = _q_row_mask(Tq, q_lengths, q.device)
    if act == SOFTMAX:
        return softmax_attention(q, k, v, keep, rows, qk_scale, pre_scale, bias=bias,
                                 dropout_p=dropout_p)
    s = _acc(torch.matmul(q, k.transpose(-2, -1))) * pre_scale
    if bias is not None:
        s = s + _acc(bias)
    if keep is not None:
        s = torch.where(keep, s, 0.0)
    p = act_fwd(s, act) * qk_scale
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p, training=True)
    o = torch.matmul(p.to(v.dtype), v)
    if rows is not None:
        o = torch.where(rows, o, 0.0)
    return o.to(q.dtype)


MASKED_ROWS = ("zero", "uniform", "nan")


def softmax_attention(q, k, v, keep, rows, qk_scale, pre_scale, bias=None, masked_rows="zero",
                      dropout_p=0.0):
    """Softmax attention ``softmax(pre_scale·q kᵀ + bias, masked by keep) @ v · qk_scale``.

    ``q [B,H,Tq,d]``, ``k``/``v`` already expanded to H heads; ``keep`` a bool
    mask broadcastable to ``[B,H,Tq,Tk]`` (None: all kept); ``bias`` additive
    (finite or -inf entries, as the model wrote them). A query row with no
    kept key gives, by ``masked_rows``:

    - ``"zero"``: 0 (and no gradient), the convention of length masks;
    - ``"uniform"``: the mean of v over all Tk keys — what the model computes
      when it fills masked scores with a finite value (``masked_fill(-1e9)``):
      every score of the row is equal, so softmax is uniform;
    - ``"nan"``: NaN (and NaN gradients into v) — what the model computes with
      a ``-inf`` fill or an all-padded ``key_padding_mask``.

    A row whose biased scores are all -inf gives 0 with ``"zero"`` (as
    ``F.scaled_dot_product_attention`` on the CPU) and NaN otherwise (as a
    model's own softmax). Rows past ``q_lengths`` (``rows``) give 0.
    ``dropout_p > 0``: the probabilities are dropped as ``F.dropout`` does.
    """
    if masked_rows not in MASKED_ROWS:
        raise ValueError(f"masked_rows must be one of {MASKED_ROWS}, got {masked_rows!r}")
    any_key = None
    if keep is not None:
        # A row with no kept key: let it attend to everything (no NaN in the
        # fused computation or its backward), then replace it.
        any_key = keep.any(dim=-1, keepdim=True)
        keep = keep | ~any_key
    if dropout_p > 0.0 and bias is None:
        bias = torch.zeros((), dtype=torch.float32, device=q.device)
    if bias is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=pre_scale)
    else:
        # Math path: an additive mask of -1e9 loses all precision in SDPA's
        # fused backward (logsumexp at 1e9); eager keeps the model's numbers.
        s = _acc(torch.matmul(q, k.transpose(-2, -1))) * pre_scale + _acc(bias)
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        if masked_rows == "zero":
            # SDPA's convention: a row whose scores are all -inf gives 0, not NaN
            dead = torch.isneginf(s).all(dim=-1, keepdim=True)
            s = s.masked_fill(dead, 0.0)
            any_key = ~dead if any_key is None else any_key & ~dead
        elif masked_rows == "uniform" and any_key is not None:
            # every score of the row equal, as the model's finite fill makes them: its
            # softmax is uniform and goes through the same dropout as in the model
            s = s.masked_fill(~any_key, 0.0)
            any_key = None
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p, training=True)
        o = torch.matmul(p.to(v.dtype), v)
    if any_key is not None:
        if masked_rows == "zero":
            fill = torch.zeros((), dtype=o.dtype, device=o.device)
        else:
            fill = v.mean(dim=-2, keepdim=True).to(o.dtype)
            if masked_rows == "nan":
                # NaN in the empty rows only, and NaN gradients into v only
                # from them (as the model's softmax of an all -inf row).
                fill = fill * torch.where(any_key, 0.0, float("nan")).to(o.dtype)
        o = torch.where(any_key, o, fill)
    if rows is not None:
        o = torch.where(rows, o, 0.0)
    if qk_scale != 1.0:
        o = o * qk_scale
    return o.to(q.dtype)


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (the bias's own shape)."""
    shape = tuple(shape)
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def _head_sum(t: torch.Tensor, hkv: int) -> torch.Tensor:
    H = t.shape[1]
    return t if hkv == H else t.unflatten(1, (hkv, H // hkv)).sum(2)


def gdpa_bwd_ref(
    grad_out, q, k, v, q_lengths=None, kv_lengths=None, activation="raw",
    qk_scale=1.0, pre_scale=1.0, window=-1, causal=False, bias=None,
):
    """Explicit GDPA backward, recomputing the scores.

    Returns ``(dq, dk, dv)`` shaped like ``q, k, v`` (GQA heads summed), and
    ``dbias`` shaped like ``bias`` as a fourth element when ``bias`` is given.
    Nothing O(T²) is kept beyond this call.
    """
    act = canonical_activation(activation)
    if act == SOFTMAX:
        return _softmax_bwd(grad_out, q, k, v, q_lengths, kv_lengths, qk_scale, pre_scale,
                            window, causal, bias)
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    ke = _acc(_expand_kv_heads(k, H))
    ve = _expand_kv_heads(v, H)
    qf = _acc(q)
    keep = _keep_mask(B, Tq, Tk, q_lengths, kv_lengths, window, q.device, causal)
    rows = _q_row_mask(Tq, q_lengths, q.device)
    if rows is not None:
        keep = rows if keep is None else keep & rows
    go = _acc(grad_out)
    s = torch.matmul(qf, ke.transpose(-2, -1)) * pre_scale
    if bias is not None:
        s = s + _acc(bias)
    if keep is not None:
        s = torch.where(keep, s, 0.0)
        go = torch.where(rows, go, 0.0) if rows is not None else go
    p = _acc((act_fwd(s, act) * qk_scale).to(v.dtype))
    dv = torch.matmul(p.transpose(-2, -1), go)
    dp = torch.matmul(go, _acc(ve).transpose(-2, -1))
    ds = act_grad(s, act) * qk_scale * dp
    if keep is not None:
        ds = torch.where(keep, ds, 0.0)
    dq = torch.matmul(ds, ke) * pre_scale
    dk = torch.matmul(ds.transpose(-2, -1), qf) * pre_scale
    out = (dq.to(q.dtype), _head_sum(dk, Hkv).to(k.dtype), _head_sum(dv, Hkv).to(v.dtype))
    if bias is not None:
        out = out + (_sum_to(ds, bias.shape).to(bias.dtype),)
    return out


def _softmax_bwd(grad_out, q, k, v, q_lengths, kv_lengths, qk_scale, pre_scale, window,
                 causal=False, bias=None):
    """Explicit softmax-attention backward (used only when the custom op itself
    is called with "softmax"; :func:`recopt.ops.gdpa` routes softmax to
    :func:`softmax_attention` and plain autograd). Rows with no kept key give 0."""
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    ke = _acc(_expand_kv_heads(k, H))
    ve = _acc(_expand_kv_heads(v, H))
    qf = _acc(q)
    keep = _keep_mask(B, Tq, Tk, q_lengths, kv_lengths, window, q.device, causal)
    rows = _q_row_mask(Tq, q_lengths, q.device)
    s = torch.matmul(qf, ke.transpose(-2, -1)) * pre_scale
    if bias is not None:
        s = s + _acc(bias)
    any_key = None
    if keep is not None:
        any_key = keep.any(dim=-1, keepdim=True)
        s = s.masked_fill(~(keep | ~any_key), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if any_key is not None:
        p = torch.where(any_key, p, 0.0)
    if rows is not None:
        p = torch.where(rows, p, 0.0)
    g = _acc(grad_out) * qk_scale
    dv = torch.matmul(p.transpose(-2, -1), g)
    dp = torch.matmul(g, ve.transpose(-2, -1))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = torch.matmul(ds, ke) * pre_scale
    dk = torch.matmul(ds.transpose(-2, -1), qf) * pre_scale
    out = (dq.to(q.dtype), _head_sum(dk, Hkv).to(k.dtype), _head_sum(dv, Hkv).to(v.dtype))
    if bias is not None:
        out = out + (_sum_to(ds, bias.shape).to(bias.dtype),)
    return out


# ----------------------------------------------------------------------------
# Jagged <-> padded (static shapes: usable under fake tensors and torch.compile)


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, max_len: int) -> torch.Tensor:
    """``values [N, *rest]`` + ``offsets [B+1]`` → ``[B, max_len, *rest]`` (zeros past each length).

    Sequences longer than ``max_len`` are truncated. Differentiable.
    """
    B = offsets.shape[0] - 1
    offsets = offsets.to(torch.long)
    lengths = offsets[1:] - offsets[:-1]
    t = torch.arange(max_len, device=values.device)
    valid = t[None, :] < lengths[:, None]                       # [B, T]
    idx = (offsets[:-1, None] + t[None, :]).clamp(max=max(values.shape[0] - 1, 0))
    if values.shape[0] == 0:
        return values.new_zeros((B, max_len) + tuple(values.shape[1:]))
    out = values[idx.reshape(-1)].reshape((B, max_len) + tuple(values.shape[1:]))
    mask = valid.reshape((B, max_len) + (1,) * (values.dim() - 1))
    return torch.where(mask, out, 0.0).to(values.dtype)


def padded_to_jagged(padded: torch.Tensor, offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of :func:`jagged_to_padded`: ``[B, T, *rest]`` → ``[total, *rest]``.

    Rows past ``T`` of a sequence (truncated) come back as zeros.
    """
    offsets = offsets.to(torch.long)
    T = padded.shape[1]
    n = torch.arange(total, device=padded.device)
    b = (torch.searchsorted(offsets, n, right=True) - 1).clamp(0, max(offsets.shape[0] - 2, 0))
    t = n - offsets[b]
    valid = t < T
    flat = padded.reshape((-1,) + tuple(padded.shape[2:]))
    if flat.shape[0] == 0:
        return padded.new_zeros((total,) + tuple(padded.shape[2:]))
    out = flat[(b * T + t.clamp(max=T - 1)).clamp(min=0)]
    mask = valid.reshape((total,) + (1,) * (padded.dim() - 2))
    return torch.where(mask, out, 0.0).to(padded.dtype)


def gdpa_jagged_ref(
    q, k, v, q_offsets, kv_offsets, max_seq_len_q, max_seq_len_kv,
    activation="raw", qk_scale=1.0, pre_scale=1.0, window=-1,
):
    """Jagged GDPA: ``q [Nq,H,d]``, ``k [Nk,Hkv,d]``, ``v [Nk,Hkv,dv]`` → ``[Nq,H,dv]``.

    Pads to ``[B, H, T, d]``, runs :func:`gdpa_ref` with lengths, un-pads.
    """
    q_len = (q_offsets[1:] - q_offsets[:-1]).to(torch.long)
    kv_len = (kv_offsets[1:] - kv_offsets[:-1]).to(torch.long)
    qp = jagged_to_padded(q, q_offsets, max_seq_len_q).transpose(1, 2)
    kp = jagged_to_padded(k, kv_offsets, max_seq_len_kv).transpose(1, 2)
    vp = jagged_to_padded(v, kv_offsets, max_seq_len_kv).transpose(1, 2)
    o = gdpa_ref(qp, kp, vp, q_len, kv_len, activation, qk_scale, pre_scale, window)
    return padded_to_jagged(o.transpose(1, 2), q_offsets, q.shape[0])
