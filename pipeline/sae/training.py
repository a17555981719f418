"""Training and evaluating SAEs (docs/METHOD.md, sections 3 and 7); the models are in `pipeline/sae/`.

Two trainers share one loop. The generic one runs autograd on each architecture's
`training_loss`. TopK's fast path does not go through autograd: `_train_step` computes the
loss and its gradients by hand, because then

- the only dense `N x n_latents x D` product per step is the encoder's forward (needed to
  choose the top k); decoding reads only the k active decoder columns (`embedding_bag`), and
  every gradient is a sampled or sparse-times-dense product over the N x k active pairs.
  Autograd through a dense decode would spend five such products per step;
- every large buffer (pre-activations, weight gradients) is allocated once and reused: a fresh
  `n_latents x D` buffer per step costs page faults that rival the arithmetic on the CPU.

The hand-written gradients are checked against autograd (and TopK's `training_loss`) in
tests/test_sae.py.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ParamsError, PipelineError
from pipeline.params.sae import SaeParams
from pipeline.progress import progress
from pipeline.sae.base import SparseAutoencoder, normalize_rows_
from pipeline.sae.batchtopk import BatchTopKSAE, MatryoshkaSAE, prefix_sizes
from pipeline.sae.jumprelu import JumpReLUSAE
from pipeline.sae.linear import LinearSAE, LossTerms, Objective, firing_sparse
from pipeline.sae.topk import FrozenRandomSAE, TopKSAE, topk_lowest_index

log = logging.getLogger(__name__)

GEOMEDIAN_SAMPLE = 4096
"""Rows of the training set used to initialise b_dec (the median barely moves beyond this)."""
GEOMEDIAN_ITERS = 30


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
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


# ---------------------------------------------------------------- training: sparse gradients
def _csr(indices: Tensor, values: Tensor, n_cols: int) -> Tensor:
    """(N, n_cols) CSR matrix with `values[i, j]` at column `indices[i, j]`.

    Every row holds exactly k entries, so the row pointers are 0, k, 2k, ...; columns must be
    unique and ascending within a row (topk_lowest_index guarantees it).
    """
    n, k = indices.shape
    crow = torch.arange(0, n * k + 1, k, device=indices.device)
    with warnings.catch_warnings():  # torch flags CSR support as "beta" on first use
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, indices.reshape(-1), values.reshape(-1), (n, n_cols), check_invariants=False
        )


def _sampled_dot(indices: Tensor, a: Tensor, rows: Tensor) -> Tensor:
    """out[i, j] = a[i] . rows[indices[i, j]] for (N, D) `a` and (L, D) `rows`: (N, k)."""
    pattern = _csr(indices, torch.zeros(indices.shape, dtype=a.dtype, device=a.device), rows.shape[0])
    # sampled_addmm computes a @ rows^T only at the pattern's entries (an SDDMM)
    return torch.sparse.sampled_addmm(pattern, a, rows.T, beta=0.0).values().reshape(indices.shape)


class _LatentMajor:
    """The (N, k) selection as a coalesced (L, N) COO matrix S^T, for `out += S^T @ dense`.

    Row j of S^T @ dense sums the rows of `dense` of the samples in which latent j is active,
    weighted: every weight gradient is one such product. Sorting the pattern once serves both
    the encoder and the decoder gradient (measured on the CPU: faster than index_add of N k
    rows, which materialises an N x k x D temporary, or than a CSR transpose).
    """

    def __init__(self, indices: Tensor, n_latents: int):
        n, k = indices.shape
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat, stable=True)  # latent-major; samples stay ascending
        self.coords = torch.stack([flat[self.order], torch.div(self.order, k, rounding_mode="floor")])
        self.shape = (n_latents, n)

    def accumulate(self, out: Tensor, values: Tensor, dense: Tensor) -> None:
        weights = values.reshape(-1)[self.order]
        sparse = torch.sparse_coo_tensor(self.coords, weights, self.shape, is_coalesced=True, check_invariants=False)
        out.addmm_(sparse, dense)  # in place: no fresh (L, D) buffer, no zero fill


class _Grads(NamedTuple):
    """Gradient buffers, allocated once and reused every step (rows: the decoder as rows)."""

    w_enc: Tensor
    b_enc: Tensor
    rows: Tensor
    b_dec: Tensor


def _backprop_codes(grad_out: Tensor, xc: Tensor, rows: Tensor, indices: Tensor, values: Tensor,
                    grads: _Grads) -> None:
    """Backward of out = sum_j values[:, j] rows[indices[:, j]], values = relu(xc W_enc^T + b_enc)
    at the selected pairs: adds the gradients of W_enc, b_enc and the decoder rows (with its
    component along each unit-norm row removed) into `grads`."""
    n_latents = rows.shape[0]
    flat = indices.reshape(-1)
    pattern = _LatentMajor(indices, n_latents)
    grad_values = _sampled_dot(indices, grad_out, rows)  # grad_out[i] . w_j

    pattern.accumulate(grads.rows, values, grad_out)
    # this term's (grad_rows[j] . w_j) is sum_i values[i, j] grad_values[i, j]: already at hand
    along = torch.zeros(n_latents, dtype=rows.dtype, device=rows.device)
    along.index_add_(0, flat, (values * grad_values).reshape(-1))
    grads.rows.addcmul_(rows, along.unsqueeze(1), value=-1.0)

    grad_pre = grad_values * (values > 0)  # through the ReLU
    pattern.accumulate(grads.w_enc, grad_pre, xc)
    grads.b_enc.index_add_(0, flat, grad_pre.reshape(-1))


def _nmse_and_grad(x_hat: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """normalized_mse, its gradient w.r.t. x_hat (the target is a constant), and the
    squared error sum ||x_hat - x||^2."""
    denominator = (x - x.mean(dim=0)).square().sum().clamp_min(1e-12)
    error = x_hat - x
    sq_err = error.square().sum()
    return sq_err / denominator, error * (2.0 / denominator), sq_err


def dead_topk(pre: Tensor, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """(values, indices) of the top min(k_aux, #dead) pre-activations among dead latents,
    indices ascending within each row."""
    dead_ids = dead.nonzero().squeeze(1)
    sub = pre[:, dead_ids]  # only the dead columns: usually few
    if dead_ids.numel() > k_aux:
        sub_values, picked = sub.topk(k_aux, dim=1, sorted=False)
        indices, order = dead_ids[picked].sort(dim=1)
        return sub_values.gather(1, order), indices
    return sub, dead_ids.expand(pre.shape[0], -1).contiguous()


@torch.no_grad()
def _train_step(sae: TopKSAE, rows: Tensor, xb: Tensor, dead: Tensor, k_aux: int, aux_coef: float,
                grads: _Grads, pre_buffer: Tensor) -> LossTerms:
    """Forward and backward of normalized_mse + aux_coef * AuxK on one scaled batch.

    Fills `grads` (zeroed here); `rows` is the (n_latents, dim) decoder. AuxK (OpenAI's):
    reconstruct the residual x - x_hat (a constant target) from the top k_aux dead latents.
    """
    for grad in grads:
        grad.zero_()
    xc = xb - sae.b_dec
    pre = torch.addmm(sae.b_enc, xc, sae.W_enc.T, out=pre_buffer[: xb.shape[0]]).relu_()
    indices = topk_lowest_index(pre, sae.k)
    values = pre.gather(1, indices)
    x_hat = F.embedding_bag(indices, rows, per_sample_weights=values, mode="sum") + sae.b_dec

    loss, grad_x_hat, sq_err = _nmse_and_grad(x_hat, xb)
    _backprop_codes(grad_x_hat, xc, rows, indices, values, grads)

    aux = torch.zeros((), dtype=xb.dtype, device=xb.device)
    if aux_coef > 0 and bool(dead.any()):
        aux_values, aux_indices = dead_topk(pre, dead, k_aux)
        e_hat = F.embedding_bag(aux_indices, rows, per_sample_weights=aux_values, mode="sum")
        aux, grad_e_hat, _ = _nmse_and_grad(e_hat, xb - x_hat)
        _backprop_codes(aux_coef * grad_e_hat, xc, rows, aux_indices, aux_values, grads)

    # b_dec is added after decoding and subtracted before encoding (xc = x - b_dec); the
    # encoder's gradient w.r.t. xc, summed over samples, is grad(b_enc) @ W_enc
    grads.b_dec.add_(grad_x_hat.sum(dim=0)).sub_(grads.b_enc @ sae.W_enc)
    return LossTerms(loss + aux_coef * aux, aux, sq_err, *firing_sparse(values, indices, sae.n_latents))


# ------------------------------------------------------------------------ training: the loop
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
        # ||x_i - y||^2 by a matrix-vector product: no (N, D) temporary per iteration
        sq_dist = (sq_norms - 2.0 * (x @ y) + y.square().sum()).clamp_min(eps * eps)
        weights = sq_dist.rsqrt()
        y = (weights @ x) / weights.sum()
    return y.float()


class _DeadTracker:
    """Samples since each latent last fired; dead once that reaches the window."""

    def __init__(self, n_latents: int, window: int, device: torch.device):
        self.since = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.window = window

    def dead(self) -> Tensor:
        return self.since >= self.window

    def update(self, fired: Tensor, n_samples: int) -> None:
        """Record a batch of `n_samples` in which the latents of the `fired` mask fired."""
        self.since.add_(n_samples).masked_fill_(fired, 0)


def build_sae(params: SaeParams, dim: int, n_latents: int, input_scale: float) -> LinearSAE:
    """An untrained SAE of `params.architecture`."""
    if params.architecture == "topk":
        return TopKSAE(dim, n_latents, params.k, input_scale=input_scale)
    if params.architecture == "frozen_random":
        return FrozenRandomSAE(dim, n_latents, params.k, input_scale=input_scale)
    if params.architecture == "batchtopk":
        return BatchTopKSAE(dim, n_latents, params.k, input_scale=input_scale)
    if params.architecture == "matryoshka":
        return MatryoshkaSAE(dim, n_latents, params.k, prefix_sizes(n_latents, params.matryoshka.prefixes), input_scale=input_scale)
    if params.architecture == "jumprelu":
        j = params.jumprelu
        return JumpReLUSAE(dim, n_latents, input_scale=input_scale, init_threshold=j.init_threshold, bandwidth=j.bandwidth)
    raise ParamsError(f"sae.architecture = {params.architecture!r}: no trainer builds it")


def _new_sae(x_train: Tensor, params: SaeParams, generator: torch.Generator) -> LinearSAE:
    n, dim = x_train.shape
    scale = input_scale_for(x_train) if params.normalize_input else 1.0
    sae = build_sae(params, dim, resolve_n_latents(params, dim), scale)
    sae.reset_parameters(generator)
    sample = x_train[torch.randperm(n, generator=generator)[:GEOMEDIAN_SAMPLE]].to(torch.float32) * scale
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample) if params.b_dec_init == "geometric_median" else sample.mean(dim=0))
    return sae


def objective_of(params: SaeParams, dim: int) -> Objective:
    return Objective(aux_coef=params.aux_coef, k_aux=params.k_aux if params.k_aux is not None else max(dim // 2, 1),
                     l0_coef=params.jumprelu.l0_coef, threshold_momentum=params.batchtopk.threshold_momentum)


def uses_fast_path(params: SaeParams, sae: LinearSAE) -> bool:
    """TopK's hand-written gradients: `trainer` fast, or auto on a (trained) TopK SAE."""
    return params.trainer == "fast" or (params.trainer == "auto" and type(sae) is TopKSAE)


def learning_rate(params: SaeParams, step: int, total_steps: int) -> float:
    """The rate at 0-based `step` of `total_steps`: linear warmup over `warmup_steps`, then
    constant, then (with `lr_decay`) linear to zero over the final `lr_decay` of the steps."""
    lr = params.lr * min(1.0, (step + 1) / params.warmup_steps) if params.warmup_steps else params.lr
    decay_steps = int(params.lr_decay * total_steps)
    if decay_steps > 0:
        lr *= min(1.0, (total_steps - step) / decay_steps)
    return lr


TrainStep = Callable[[Tensor, Tensor], LossTerms]
"""(scaled batch, dead mask) -> the step's loss terms, after the weights moved."""


def _fast_step(sae: TopKSAE, params: SaeParams, objective: Objective, batch_size: int, device: torch.device
               ) -> tuple[TrainStep, torch.optim.Optimizer, Callable[[], None]]:
    # The decoder is optimised through W_dec's contiguous (n_latents, dim) view, as a leaf of
    # its own: Adam's fused kernel would copy the transposed W_dec to and fro on every step.
    rows = nn.Parameter(sae.W_dec.data.T)
    weights = (sae.W_enc, sae.b_enc, rows, sae.b_dec)
    for w in weights:
        w.grad = torch.zeros_like(w)
    grads = _Grads(*(w.grad for w in weights))
    pre_buffer = torch.empty(batch_size, sae.n_latents, device=device)
    optimizer = torch.optim.Adam(weights, lr=params.lr, fused=device.type in ("cpu", "cuda"))

    def step(xb: Tensor, dead: Tensor) -> LossTerms:
        result = _train_step(sae, rows, xb, dead, objective.k_aux, objective.aux_coef, grads, pre_buffer)
        optimizer.step()
        normalize_rows_(rows)
        return result

    def done() -> None:
        for w in weights:
            w.grad = None

    return step, optimizer, done


def _autograd_step(sae: LinearSAE, params: SaeParams, objective: Objective, device: torch.device
                   ) -> tuple[TrainStep, torch.optim.Optimizer | None, Callable[[], None]]:
    trainable = [] if sae.frozen() else [p for p in sae.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda")  # one kernel for all parameters, as the fast path
    optimizer = torch.optim.Adam(trainable, lr=params.lr, fused=fused) if trainable else None

    def step(xb: Tensor, dead: Tensor) -> LossTerms:
        if optimizer is None:  # the frozen control: the objective only, for the record
            with torch.no_grad():
                terms = sae.training_loss(xb, dead, objective)
            return terms
        optimizer.zero_grad(set_to_none=False)
        terms = sae.training_loss(xb, dead, objective)
        terms.loss.backward()
        sae.remove_parallel_grad_()
        optimizer.step()
        sae.after_step()
        return terms._replace(loss=terms.loss.detach(), aux_loss=terms.aux_loss.detach(), sq_err=terms.sq_err.detach())

    return step, optimizer, lambda: sae.zero_grad(set_to_none=True)


def train_sae(
    x_train: Tensor,
    params: SaeParams,
    device: torch.device | str,
    x_eval: Tensor | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    *,
    init: LinearSAE | None = None,
) -> tuple[LinearSAE, list[dict[str, Any]]]:
    """Train an SAE of `params.architecture` on (N, D) raw embeddings; return it (in eval mode)
    and per-epoch rows. TopK trains on the hand-written fast path unless `params.trainer` says
    autograd; every other architecture through autograd on its `training_loss`; the frozen
    control runs its objective without a step (its weights never change).

    Each row: epoch, loss (mean total loss), aux_loss, train_fvu (running estimate over the
    epoch's batches, before each step), test_fvu (on `x_eval`, None without it), l0,
    dead_fraction (latents that did not fire during the epoch), samples_per_s.

    `init` continues training that SAE in place (its k, width, input_scale and b_dec are
    kept; `params` then only sets the schedule) instead of initialising a new one.
    """
    device = torch.device(device)
    n, dim = x_train.shape
    generator = torch.Generator().manual_seed(params.seed)
    sae = _new_sae(x_train, params, generator) if init is None else init
    if sae.dim != dim:
        raise ValueError(f"init SAE has dim {sae.dim}, the embeddings {dim}")
    if params.trainer == "fast" and type(sae) is not TopKSAE:
        raise ParamsError(f"sae.trainer = 'fast': trains only topk SAEs, not {sae.ARCHITECTURE!r}")
    sae.to(device).train()
    xs = x_train.to(device, torch.float32) * sae.input_scale
    n_latents, batch_size = sae.n_latents, min(params.batch_size, n)
    objective = objective_of(params, dim)
    if uses_fast_path(params, sae):
        step_fn, optimizer, done = _fast_step(sae, params, objective, batch_size, device)
    else:
        step_fn, optimizer, done = _autograd_step(sae, params, objective, device)
    tracker = _DeadTracker(n_latents, params.dead_window or n, device)
    total_dev = float(xs.var(dim=0, unbiased=False).double().sum()) * n

    history: list[dict[str, Any]] = []
    step, total_steps = 0, params.epochs * math.ceil(n / batch_size)
    for epoch in progress(range(1, params.epochs + 1), desc="train_sae", unit="epoch"):
        start_time = time.perf_counter()
        perm = torch.randperm(n, generator=generator).to(device)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, aux, sq_err, active
        fired_epoch = torch.zeros(n_latents, dtype=torch.bool, device=device)
        n_batches = 0
        for begin in range(0, n, batch_size):
            xb = xs[perm[begin : begin + batch_size]]
            lr = learning_rate(params, step, total_steps)
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr
            result = step_fn(xb, tracker.dead())

            with torch.no_grad():
                tracker.update(result.fired, xb.shape[0])
                fired_epoch |= result.fired
                sums += torch.stack([result.loss, result.aux_loss, result.sq_err, result.active.to(result.loss.dtype)]).double()
            n_batches += 1
            step += 1

        elapsed = time.perf_counter() - start_time
        loss_sum, aux_sum, sq_err_sum, active_sum = sums.tolist()
        row = {
            "epoch": epoch,
            "loss": loss_sum / n_batches,
            "aux_loss": aux_sum / n_batches,
            "train_fvu": sq_err_sum / total_dev,
            "test_fvu": evaluate_sae(sae, x_eval)["fvu"] if x_eval is not None else None,
            "l0": active_sum / n,
            "dead_fraction": 1.0 - float(fired_epoch.sum()) / n_latents,
            "samples_per_s": n / elapsed,
        }
        history.append(row)
        log.debug("epoch %d: %s", epoch, row)
        if on_epoch is not None:
            on_epoch(row)
    done()
    return sae.eval(), history
