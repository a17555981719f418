"""TopK sparse autoencoder (METHOD.md section 3): model, training loop, evaluation, save/load.

    z     = TopK_k(ReLU(W_enc (s x - b_dec) + b_enc))
    x_hat = (W_dec z + b_dec) / s

`s` is `input_scale`, one constant chosen on the training set so that the scaled embeddings
have mean squared norm D (`normalize_input`); it is folded into the public methods, so every
method takes and returns RAW embeddings while `z` lives in the SAE's normalised space. Decoding
is linear plus a bias in raw space, which is what steering relies on:
`x' = x + (decode(z') - decode(z))`.

Speed: the only dense `n_latents x D` product per step is the encoder's forward (needed to
choose the top k). Everything after the choice touches only the k active latents, forward and
backward: decoding is an `embedding_bag` over the active decoder columns, and two small
autograd functions (`_SelectedPreacts`, `_SparseDecode`) compute the encoder and decoder
gradients as sparse-times-dense products. A dense autograd graph would instead spend five more
`N x n_latents x D` products per step (encoder backward twice, decoder forward and backward).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.io import PipelineError, load_weights, save_weights
from pipeline.params import ParamsError, SaeParams
from pipeline.progress import progress

log = logging.getLogger(__name__)

FORMAT = "topk_sae"
FORMAT_VERSION = 1
GEOMEDIAN_SAMPLE = 4096
"""Rows of the training set used to initialise b_dec (the median barely moves beyond this)."""
GEOMEDIAN_ITERS = 30

# CSR tensors are "beta" in torch and warn on every construction; the layout we build is
# checked by the tests (sorted, unique columns, exactly k per row).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class SAEOutput(NamedTuple):
    """What training, statistics and steering need from one forward pass (raw space)."""

    x_hat: Tensor
    """(N, D) reconstruction in raw embedding space."""
    values: Tensor
    """(N, k) activations of the selected latents (>= 0; 0 when fewer than k are positive)."""
    indices: Tensor
    """(N, k) int64 selected latents, ascending within each row."""
    pre_acts: Tensor
    """(N, n_latents) ReLU'd pre-activations before the top-k choice (detached)."""


# ------------------------------------------------------------------------- sparse primitives
def _csr(indices: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """(N, n_cols) CSR matrix with `values[i, j]` at column `indices[i, j]`.

    Every row holds exactly k entries, so the row pointers are 0, k, 2k, ...; columns must be
    unique and ascending within a row (encode_topk guarantees it).
    """
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    return torch.sparse_csr_tensor(
        crow, indices.reshape(-1), values.reshape(-1), (n, n_cols), check_invariants=False
    )


def _sparse_t_matmul(indices: Tensor, values: Tensor, n_rows: int, dense: Tensor) -> Tensor:
    """S^T @ dense for S = _csr(indices, values): (n_rows, dense.shape[1]).

    This is every weight gradient here: row j of the result sums the rows of `dense` of the
    samples in which latent j is active.
    """
    n, k = indices.shape
    samples = torch.arange(n, device=indices.device).repeat_interleave(k)
    # (N, n_rows) COO, transposed: measured faster on the CPU than index_add of N k rows of D
    # (which materialises an N k D temporary) or a CSR transpose.
    sparse = torch.sparse_coo_tensor(
        torch.stack([samples, indices.reshape(-1)]), values.reshape(-1), (n, n_rows), check_invariants=False
    )
    return torch.sparse.mm(sparse.t(), dense)


def _sampled_dot(indices: Tensor, a: Tensor, rows: Tensor) -> Tensor:
    """out[i, j] = a[i] . rows[indices[i, j]] for (N, D) `a` and (L, D) `rows`: (N, k)."""
    pattern = _csr(indices, torch.zeros(indices.shape, dtype=a.dtype, device=a.device), rows.shape[0])
    # sampled_addmm computes a @ rows^T only at the pattern's entries (an SDDMM).
    out = torch.sparse.sampled_addmm(pattern, a, rows.T, beta=0.0)
    return out.values().reshape(indices.shape)


class _SelectedPreacts(torch.autograd.Function):
    """Values of the selected pre-activations with a sparse backward.

    Forward: relu(xc . W_enc[j] + b_enc[j]) at the selected (i, j), read from the already
    computed dense pre-activations. Backward touches only those entries, so W_enc's gradient
    costs N k D instead of N n_latents D.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, w_enc: Tensor, b_enc: Tensor, indices: Tensor, selected: Tensor) -> Tensor:
        ctx.save_for_backward(xc, w_enc, indices, selected)
        return selected.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, w_enc, indices, selected = ctx.saved_tensors
        grad = grad * (selected > 0)  # ReLU
        grad_xc = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_xc = _csr(indices, grad, w_enc.shape[0]) @ w_enc
        if ctx.needs_input_grad[1]:
            grad_w = _sparse_t_matmul(indices, grad, w_enc.shape[0], xc)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(w_enc.shape[0], dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_xc, grad_w, grad_b, None, None


class _SparseDecode(torch.autograd.Function):
    """sum_j values[i, j] * dec_rows[indices[i, j]] with a sparse backward (no bias)."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, dec_rows: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, dec_rows)
        return F.embedding_bag(indices, dec_rows, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, dec_rows = ctx.saved_tensors
        grad_values = grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_values = _sampled_dot(indices, grad.contiguous(), dec_rows)
        if ctx.needs_input_grad[2]:
            grad_rows = _sparse_t_matmul(indices, values, dec_rows.shape[0], grad)
        return grad_values, None, grad_rows


def topk_lowest_index(pre: Tensor, k: int) -> Tensor:
    """Indices (N, k) of the k largest entries per row, ascending; ties go to the lowest index.

    torch.topk leaves ties unspecified. Rows whose k-th value is tied with an unselected entry
    (common: ReLU zeros when fewer than k latents are positive) are redone exactly: everything
    strictly above the k-th value, then the lowest-indexed entries equal to it.
    """
    with torch.no_grad():
        n_latents = pre.shape[1]
        if k >= n_latents:
            return torch.arange(n_latents, device=pre.device).expand(pre.shape[0], n_latents).clone()
        # one extra value tells whether the k-th is tied with an unselected entry, without a
        # pass over the whole (N, n_latents) matrix
        values, indices = pre.topk(k + 1, dim=1, sorted=True)
        tied = values[:, k] == values[:, k - 1]
        indices = indices[:, :k]
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            sub, sub_kth = pre[rows], values[rows, k - 1 : k]
            above = sub > sub_kth
            need = k - above.sum(dim=1, keepdim=True)
            equal = sub == sub_kth
            take = above | (equal & (equal.cumsum(dim=1) <= need))
            indices[rows] = take.nonzero()[:, 1].reshape(-1, k)
        return indices.sort(dim=1).values


@torch.no_grad()
def normalize_rows_(rows: Tensor) -> None:
    """Unit-norm rows, in place."""
    rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_(grad: Tensor, rows: Tensor) -> None:
    """grad_j -= (grad_j . w_j) w_j for unit-norm rows w_j, in place.

    With unit-norm decoder columns that component would only change their norm, which the
    renormalisation after the step undoes anyway; removing it keeps Adam's moments clean.
    """
    grad.addcmul_(rows, torch.linalg.vecdot(grad, rows).unsqueeze(1), value=-1.0)


# ---------------------------------------------------------------------------------- the model
class TopKSAE(nn.Module):
    """TopK SAE D -> n_latents with unit-norm decoder columns; public methods use raw space."""

    def __init__(self, dim: int, n_latents: int, k: int, input_scale: float = 1.0):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents={n_latents}], got {k}")
        if not (math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {input_scale}")
        self.dim, self.n_latents, self.k = dim, n_latents, k
        self.input_scale = float(input_scale)
        self.W_enc = nn.Parameter(torch.empty(n_latents, dim))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        # W_dec is (dim, n_latents) but stored transposed in memory, so that its columns (the
        # rows of W_dec.T) are contiguous: embedding_bag then reads them without a copy.
        self.W_dec = nn.Parameter(torch.empty(n_latents, dim).T)
        self.b_dec = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    # -- initialisation and the unit-norm constraint
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit-norm decoder columns, W_enc = W_dec^T, zero biases."""
        directions = torch.randn(self.n_latents, self.dim, generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        self.W_dec.copy_(directions.T)
        self.W_enc.copy_(directions)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def normalize_decoder_(self) -> None:
        """Rescale every decoder column to unit norm (in place, keeping the memory layout)."""
        normalize_rows_(self.W_dec.T)  # the contiguous (n_latents, dim) view

    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder column's gradient along the column."""
        if self.W_dec.grad is not None:
            remove_parallel_(self.W_dec.grad.T, self.W_dec.T)

    def _dec_rows(self) -> Tensor:
        """W_dec^T as (n_latents, dim) contiguous rows (a view unless the layout was changed)."""
        rows = self.W_dec.T
        return rows if rows.is_contiguous() else rows.contiguous()

    # -- normalised-space internals (what training uses)
    def _scaled_forward(
        self, xs: Tensor, dec_rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(x_hat_s, values, indices, pre_acts, xc) for inputs already multiplied by input_scale.

        `dec_rows` replaces W_dec^T (training passes a leaf alias of the same memory).
        """
        dec_rows = self._dec_rows() if dec_rows is None else dec_rows
        xc = xs - self.b_dec
        with torch.no_grad():
            pre = F.linear(xc, self.W_enc, self.b_enc).relu_()
            indices = topk_lowest_index(pre, self.k)
            selected = pre.gather(1, indices)
        values = _SelectedPreacts.apply(xc, self.W_enc, self.b_enc, indices, selected)
        x_hat = _SparseDecode.apply(values, indices, dec_rows) + self.b_dec
        return x_hat, values, indices, pre, xc

    # -- public API, raw space
    def pre_activations(self, x: Tensor) -> Tensor:
        """(N, n_latents) ReLU'd pre-activations, before the top-k choice."""
        return F.linear(x * self.input_scale - self.b_dec, self.W_enc, self.b_enc).relu()

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """values (N, k) >= 0 and indices (N, k) int64 (ascending), exactly k per row."""
        pre = self.pre_activations(x)
        indices = topk_lowest_index(pre, self.k)
        return pre.gather(1, indices), indices

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes (N, n_latents): the k entries of encode_topk, zeros elsewhere."""
        values, indices = self.encode_topk(x)
        return torch.zeros(x.shape[0], self.n_latents, dtype=values.dtype, device=values.device).scatter(
            1, indices, values
        )

    def decode(self, z: Tensor) -> Tensor:
        """Dense codes (N, n_latents) -> raw-space reconstruction (N, D)."""
        return (z @ self.W_dec.T + self.b_dec) / self.input_scale

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """Same as decode(encode-like z) but reading only the k active decoder columns."""
        return (_SparseDecode.apply(values, indices, self._dec_rows()) + self.b_dec) / self.input_scale

    def forward(self, x: Tensor) -> SAEOutput:
        x_hat, values, indices, pre, _ = self._scaled_forward(x * self.input_scale)
        return SAEOutput(x_hat / self.input_scale, values, indices, pre)

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "n_latents": self.n_latents,
            "k": self.k,
            "input_scale": self.input_scale,
        }


# ------------------------------------------------------------------------------ save / load
STATE_SHAPES = {"W_enc": ("n_latents", "dim"), "b_enc": ("n_latents",), "W_dec": ("dim", "n_latents"), "b_dec": ("dim",)}


def save_sae(directory: Path | str, sae: TopKSAE, extra_config: dict[str, Any]) -> None:
    """Write safetensors weights plus config.json; the SAE's own config keys win over extras."""
    save_weights(directory, sae.state_dict(), {**extra_config, **sae.config()})


def load_sae(directory: Path | str) -> TopKSAE:
    """Load an SAE written by save_sae (on the CPU); any mismatch is a clear PipelineError."""
    state, config = load_weights(directory)
    if config.get("format") != FORMAT:
        raise PipelineError(f"{directory}: not a TopK SAE (config format {config.get('format')!r})")
    try:
        sae = TopKSAE(int(config["dim"]), int(config["n_latents"]), int(config["k"]), float(config["input_scale"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"{directory}/config.json: bad or missing SAE field ({exc})") from None
    sizes = {"dim": sae.dim, "n_latents": sae.n_latents}
    for name, dims in STATE_SHAPES.items():
        expected = tuple(sizes[d] for d in dims)
        if name not in state:
            raise PipelineError(f"{directory}: weights lack tensor '{name}'")
        if tuple(state[name].shape) != expected:
            raise PipelineError(
                f"{directory}: tensor '{name}' has shape {tuple(state[name].shape)}, config implies {expected}"
            )
    unknown = sorted(set(state) - set(STATE_SHAPES))
    if unknown:
        raise PipelineError(f"{directory}: unexpected tensors {unknown}")
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(state[name].to(param.dtype))  # copy_ keeps W_dec's memory layout
    return sae


# -------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_sae(sae: TopKSAE, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Raw-space mse (mean over samples and dims), fvu, mean l0, dead_fraction on `x`.

    fvu = sum ||x - x_hat||^2 / sum ||x - mean x||^2; a latent is dead when it never fires
    (positive activation) on any row of `x`.
    """
    device = sae.b_dec.device
    mean = x.double().mean(dim=0).to(device)
    sq_err = sq_dev = active = 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device, torch.float32)
        out = sae(xb)
        sq_err += float((xb - out.x_hat).double().square().sum())
        sq_dev += float((xb.double() - mean).square().sum())
        on = out.values > 0
        active += float(on.sum())
        fired[out.indices[on]] = True
    n = x.shape[0]
    return {
        "mse": sq_err / (n * x.shape[1]),
        "fvu": sq_err / sq_dev if sq_dev > 0 else float("nan"),
        "l0": active / n,
        "dead_fraction": 1.0 - float(fired.sum()) / sae.n_latents,
    }


# --------------------------------------------------------------------------------- training
def resolve_n_latents(params: SaeParams, dim: int) -> int:
    """Number of latents for embeddings of width `dim`; a k or k_aux that does not fit is a ParamsError."""
    n_latents = params.n_latents if params.n_latents is not None else params.expansion * dim
    if params.k > n_latents:
        raise ParamsError(f"sae.k = {params.k}: must be <= the number of latents ({n_latents} for D = {dim})")
    if params.k_aux is not None and params.k_aux > n_latents:
        raise ParamsError(f"sae.k_aux = {params.k_aux}: must be <= the number of latents ({n_latents} for D = {dim})")
    return n_latents


def input_scale_for(x: Tensor) -> float:
    """The constant s with mean ||s x||^2 = D."""
    mean_sq = float(x.double().square().sum(dim=1).mean())
    if mean_sq <= 0:
        raise PipelineError("the training embeddings are all zero; cannot normalise them")
    return math.sqrt(x.shape[1] / mean_sq)


def geometric_median(x: Tensor, iters: int = GEOMEDIAN_ITERS, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's iteration from the mean: argmin_y sum_i ||x_i - y||."""
    x = x.double()
    sq_norms = x.square().sum(dim=1)
    y = x.mean(dim=0)
    for _ in range(iters):
        # ||x_i - y||^2 by two matrix-vector products: no (N, D) temporary per iteration
        sq_dist = (sq_norms - 2.0 * (x @ y) + y.square().sum()).clamp_min(eps * eps)
        weights = sq_dist.rsqrt()
        y = (weights @ x) / weights.sum()
    return y.float()


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """mse(x_hat, x) / mse(mean x, x): OpenAI's loss, a batch estimate of the FVU."""
    return (x_hat - x).square().sum() / (x - x.mean(dim=0)).square().sum().clamp_min(1e-12)


def auxk_loss(
    sae: TopKSAE, xc: Tensor, pre: Tensor, residual: Tensor, dead: Tensor, k_aux: int, dec_rows: Tensor | None = None
) -> Tensor:
    """Reconstruct the detached residual from the top `k_aux` dead latents (OpenAI's AuxK).

    Zero when no latent is dead. `pre` are the batch's ReLU'd pre-activations, `xc` the
    centred scaled inputs they came from, `dead` a (n_latents,) bool mask.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return xc.new_zeros(())
    k = min(k_aux, n_dead)
    with torch.no_grad():
        # pre >= 0, so -1 keeps every live latent out of the choice
        indices = pre.masked_fill(~dead, -1.0).topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        selected = pre.gather(1, indices)
    values = _SelectedPreacts.apply(xc, sae.W_enc, sae.b_enc, indices, selected)
    e_hat = _SparseDecode.apply(values, indices, sae._dec_rows() if dec_rows is None else dec_rows)
    return normalized_mse(e_hat, residual)


class _DeadTracker:
    """Samples since each latent last fired; dead once that reaches the window."""

    def __init__(self, n_latents: int, window: int, device: torch.device):
        self.since = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.window = window

    def dead(self) -> Tensor:
        return self.since >= self.window

    def update(self, values: Tensor, indices: Tensor) -> Tensor:
        fired = torch.zeros_like(self.since, dtype=torch.bool)
        fired[indices[values > 0]] = True
        self.since += values.shape[0]
        self.since[fired] = 0
        return fired


def train_sae(
    x_train: Tensor,
    params: SaeParams,
    device: torch.device | str,
    x_eval: Tensor | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[TopKSAE, list[dict[str, Any]]]:
    """Train a TopK SAE on (N, D) raw embeddings; return it (in eval mode) and per-epoch rows.

    Each row: epoch, loss (mean total loss), aux_loss, train_fvu (running estimate over the
    epoch's batches, before each step), test_fvu (on `x_eval`, None without it), l0,
    dead_fraction (latents that did not fire during the epoch), samples_per_s.
    """
    device = torch.device(device)
    n, dim = x_train.shape
    n_latents = resolve_n_latents(params, dim)
    generator = torch.Generator().manual_seed(params.seed)
    scale = input_scale_for(x_train) if params.normalize_input else 1.0

    sae = TopKSAE(dim, n_latents, params.k, input_scale=scale)
    sae.reset_parameters(generator)
    xs = x_train.to(torch.float32) * scale
    sample = xs[torch.randperm(n, generator=generator)[:GEOMEDIAN_SAMPLE]]
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample) if params.b_dec_init == "geometric_median" else sample.mean(dim=0))
    sae.to(device)
    xs = xs.to(device)
    # W_dec is stored transposed; Adam's fused kernel would copy that non-contiguous tensor to
    # and fro on every step, so the loop optimises a contiguous leaf alias of the same memory.
    dec_rows = nn.Parameter(sae.W_dec.data.T)

    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam([sae.W_enc, sae.b_enc, dec_rows, sae.b_dec], lr=params.lr, fused=fused)
    k_aux = params.k_aux if params.k_aux is not None else max(dim // 2, 1)
    tracker = _DeadTracker(n_latents, params.dead_window or n, device)
    total_dev = float(xs.var(dim=0, unbiased=False).double().sum()) * n

    history: list[dict[str, Any]] = []
    step = 0
    for epoch in progress(range(1, params.epochs + 1), desc="train_sae", unit="epoch"):
        sae.train()
        start_time = time.perf_counter()
        perm = torch.randperm(n, generator=generator).to(device)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, aux, sq_err, active
        fired_epoch = torch.zeros(n_latents, dtype=torch.bool, device=device)
        n_batches = 0
        for begin in range(0, n, params.batch_size):
            xb = xs[perm[begin : begin + params.batch_size]]
            lr = params.lr * min(1.0, (step + 1) / params.warmup_steps) if params.warmup_steps else params.lr
            for group in optimizer.param_groups:
                group["lr"] = lr

            x_hat, values, indices, pre, xc = sae._scaled_forward(xb, dec_rows)
            loss = normalized_mse(x_hat, xb)
            aux = xb.new_zeros(())
            if params.aux_coef > 0:
                aux = auxk_loss(sae, xc, pre, (xb - x_hat).detach(), tracker.dead(), k_aux, dec_rows)
            total = loss + params.aux_coef * aux

            optimizer.zero_grad(set_to_none=True)
            total.backward()
            remove_parallel_(dec_rows.grad, dec_rows)
            optimizer.step()
            normalize_rows_(dec_rows)

            with torch.no_grad():
                fired_epoch |= tracker.update(values, indices)
                sums += torch.stack(
                    [total.double(), aux.double(), (xb - x_hat).double().square().sum(), (values > 0).sum().double()]
                )
            n_batches += 1
            step += 1

        elapsed = time.perf_counter() - start_time
        loss_sum, aux_sum, sq_err, active = sums.tolist()
        row = {
            "epoch": epoch,
            "loss": loss_sum / n_batches,
            "aux_loss": aux_sum / n_batches,
            "train_fvu": sq_err / total_dev,
            "test_fvu": evaluate_sae(sae.eval(), x_eval)["fvu"] if x_eval is not None else None,
            "l0": active / n,
            "dead_fraction": 1.0 - float(fired_epoch.sum()) / n_latents,
            "samples_per_s": n / elapsed,
        }
        history.append(row)
        log.debug("epoch %d: %s", epoch, row)
        if on_epoch is not None:
            on_epoch(row)
    return sae.eval(), history
