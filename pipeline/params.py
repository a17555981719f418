"""Typed parameters: one pydantic model per `params.yaml` section.

Every field's docstring is its documentation (shown by `pipeline params-doc` and in the
README). Parameters are validated once, at the edge (`load_params`); inner code receives these
typed objects, never dicts. A bad value raises `ParamsError`, whose message names the key path,
the bad value and what is allowed; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Device = Literal["auto", "cpu", "cuda"]
HeadPath = Literal["auto", "masked", "skipping"]
"""How eval forwards run the gated blocks: `masked` computes every head and zeroes the dropped
ones, `skipping` computes only the kept heads (grouped by gate pattern; outputs equal up to
float rounding), `auto` skips on a CPU and masks on a GPU (where skipping measured slower)."""


class ParamsError(ValueError):
    """A parameter file that cannot be used: the message is meant for the user, verbatim."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------- data
class SyntheticParams(Section):
    """The offline demo data set: classes are combinations of shape, colour and texture."""

    num_classes: Annotated[int, Field(ge=2, le=48)] = 10
    """Number of classes (distinct shape x colour x texture combinations, at most 4*4*3 = 48)."""
    train_per_class: Annotated[int, Field(ge=1)] = 400
    """Training images per class."""
    test_per_class: Annotated[int, Field(ge=1)] = 100
    """Test images per class."""
    image_size: Annotated[int, Field(ge=16, le=256)] = 32
    """Side of the square RGB images, in pixels."""
    noise: Annotated[float, Field(ge=0.0, le=1.0)] = 0.08
    """Standard deviation of the per-pixel Gaussian noise (images in [0, 1])."""


class DataParams(Section):
    """`download`: where the images come from; writes data/dataset/{train,test}.parquet."""

    source: Literal["synthetic", "imagefolder", "cifar100"] = "synthetic"
    """`synthetic` (offline default), `imagefolder` (a SPLIT/CLASS/*.png tree at `path`) or
    `cifar100` (torchvision's download, checksum-verified, cached under `path`)."""
    path: Path | None = None
    """`imagefolder`: the root holding `train/` and `test/`. `cifar100`: the download cache
    directory (default `data/raw`)."""
    class_names: Path | None = None
    """`imagefolder` with class folders named by an ID (e.g. WordNet IDs): a file of
    `ID<TAB>name` lines giving the names reports and plots show (ImageNet's words.txt works: the
    first comma-separated synonym is used). Null keeps the folder names. Edits inside the file
    are not a DVC dependency (as for `path`): rerun `dvc repro -f download` after one."""
    max_per_class: Annotated[int, Field(ge=1)] | None = None
    """Keep at most this many images per class and split (the first ones in source order);
    null keeps all."""
    val_per_class: Annotated[int, Field(ge=0)] = 50
    """Training images per class moved into the validation split data/dataset/val.parquet
    (drawn with `seed`, the same for every class count): `steer` chooses its alphas there, so
    the test split only reports. 50 keeps CIFAR-100 at 45,000 training images; 0: no split."""
    seed: int = 0
    """Seed of the synthetic generator and of the validation draw."""
    synthetic: SyntheticParams = SyntheticParams()
    """Shape of the synthetic data set (used only when `source` is `synthetic`)."""

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.source == "imagefolder" and self.path is None:
            raise ValueError("source 'imagefolder' needs `path` (a folder with train/ and test/)")
        if self.class_names is not None and self.source != "imagefolder":
            raise ValueError(f"`class_names` names image folders: it needs source 'imagefolder', not {self.source!r}")
        return self


# -------------------------------------------------------------------------------------- model
class ModelParams(Section):
    """The head-gated ViT: any timm ViT plus AdaViT-style per-head gates."""

    name: str = "vit_small_patch16_224"
    """timm model name (a VisionTransformer with a class token), e.g. `vit_small_patch16_224`,
    `deit_small_patch16_224`. The shape fields below override its defaults."""
    pretrained: bool = False
    """Load timm's pretrained weights (a hub download; offline this fails with a clear message)."""
    checkpoint: Path | None = None
    """A local timm state dict (.safetensors, or .pth/.bin loaded with weights_only) to start
    from, for air-gapped machines. Exclusive with `pretrained`."""
    img_size: Annotated[int, Field(ge=8)] | None = None
    """Input side in pixels (images are resized to it); null keeps the timm default."""
    patch_size: Annotated[int, Field(ge=1)] | None = None
    """Patch side in pixels; null keeps the timm default."""
    embed_dim: Annotated[int, Field(ge=8)] | None = None
    """Width of the residual stream; null keeps the timm default."""
    depth: Annotated[int, Field(ge=2)] | None = None
    """Number of blocks; null keeps the timm default."""
    num_heads: Annotated[int, Field(ge=1)] | None = None
    """Attention heads per block; null keeps the timm default."""
    keep_layers: Annotated[int, Field(ge=0)] = 1
    """Blocks before this index are never gated (AdaViT: 1, every block but the first)."""
    gate_bias_init: float = 2.0
    """Initial bias of every decision network (ours: sigmoid(2) = 0.88, so training starts with
    most heads kept and a pretrained model's function is preserved)."""

    @model_validator(mode="after")
    def _consistent(self) -> ModelParams:
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("`pretrained` and `checkpoint` are exclusive: choose one")
        if self.img_size is not None and self.patch_size is not None:
            if self.img_size % self.patch_size:
                raise ValueError(
                    f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}"
                )
        if self.embed_dim is not None and self.num_heads is not None:
            if self.embed_dim % self.num_heads:
                raise ValueError(
                    f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
                )
        if self.depth is not None and self.keep_layers >= self.depth:
            raise ValueError(f"keep_layers {self.keep_layers} must be < depth {self.depth}")
        return self


# ----------------------------------------------------------------------------------- finetune
class AugmentParams(Section):
    """Training augmentation, applied at the data set's native resolution before resizing."""

    crop_padding: Annotated[int, Field(ge=0)] = 4
    """Random crop after zero-padding every side by this many pixels (0 disables)."""
    hflip: bool = True
    """Random horizontal flip with probability 0.5."""
    policy: Literal["none", "trivialaugment", "randaugment"] = "none"
    """A per-image policy of torchvision's v2 transforms after crop and flip: TrivialAugment
    (one random op of random strength) or RandAugment (`randaugment_ops` ops at
    `randaugment_magnitude`); what from-scratch ViTs on small data sets need."""
    randaugment_ops: Annotated[int, Field(ge=1, le=8)] = 2
    """RandAugment: operations per image."""
    randaugment_magnitude: Annotated[int, Field(ge=0, le=30)] = 9
    """RandAugment: strength of every operation (of 31 bins)."""
    mixup_alpha: Annotated[float, Field(ge=0)] = 0.0
    """MixUp: Beta(alpha, alpha) mixing of a batch with its reversal, labels mixed alike (0 off)."""
    cutmix_alpha: Annotated[float, Field(ge=0)] = 0.0
    """CutMix: a Beta(alpha, alpha)-sized box pasted from the reversed batch (0 off). With
    both on, each batch uses one of the two at random (as timm does)."""


class FinetuneParams(Section):
    """`finetune`: trains the gated ViT with cross-entropy plus the head-usage loss."""

    epochs: Annotated[int, Field(ge=1)] = 10
    """Passes over the training set."""
    batch_size: Annotated[int, Field(ge=1)] = 128
    """Global batch size (split evenly across torchrun processes)."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Peak AdamW learning rate (reached after warmup, then cosine decay to `min_lr`)."""
    min_lr: Annotated[float, Field(ge=0)] = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    """Linear warmup length, in epochs (fractions allowed)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    """AdamW weight decay (not applied to biases, norms, embeddings or tokens)."""
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Cross-entropy label smoothing."""
    augment: AugmentParams = AugmentParams()
    """Training augmentation."""
    tau: Annotated[float, Field(gt=0)] = 5.0
    """Gumbel-sigmoid temperature of the training gates (AdaViT: 5)."""
    head_target: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Target mean head usage of the usage loss (AdaViT: 0.5)."""
    head_weight: Annotated[float, Field(ge=0)] = 2.0
    """Weight of the usage loss |mean(gates) - head_target| (AdaViT: 2.0)."""
    seed: int = 0
    """Seed of initialisation, shuffling, augmentation and Gumbel noise."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """`bf16` autocasts the forward on CUDA; the CPU always runs fp32."""
    num_workers: Annotated[int, Field(ge=0)] = 0
    """Threads that decode the data set's PNGs before training (0: main thread only)."""
    nproc: Annotated[int, Field(ge=1)] = 1
    """Processes per node; above 1 the stage runs under torchrun with DistributedDataParallel
    (gloo on CPU, nccl on GPU)."""
    resume: bool = False
    """Continue from the last epoch checkpoint in models/vit_ckpt/ if one exists."""

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} must be <= lr {self.lr}")
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} must be <= epochs {self.epochs}")
        if self.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by nproc {self.nproc}")
        return self


# ------------------------------------------------------------------------------------ extract
class ExtractParams(Section):
    """`extract`: CLS residual inputs and gate decisions of every image, into Parquet."""

    batch_size: Annotated[int, Field(ge=1)] = 256
    """Images per forward pass (and per Parquet row group)."""
    layers: list[Annotated[int, Field(ge=0)]] = []
    """Extra blocks whose CLS input is stored too (column `x_block<i>`); the final block's
    input is always stored as `x`."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    heads: HeadPath = "auto"
    """`masked`, `skipping` (compute only the kept heads) or `auto` (skipping on a CPU, masked on
    a GPU); the path taken is recorded in the embeddings' metadata. Outputs agree to ~1e-6, not
    bit for bit, so the choice is part of what makes the stored bytes."""
    nproc: Annotated[int, Field(ge=1)] = 1
    """Processes per node; above 1 the stage runs under torchrun, every process extracting an
    interleaved share of the batches, and rank 0 merges the shares into files byte-identical
    to a single-process run."""


# ---------------------------------------------------------------------------------------- sae
class SaeParams(Section):
    """`train_sae`: the sparse autoencoder on the final block's CLS input."""

    architecture: Literal["topk"] = "topk"
    """SAE kind (`pipeline.sae.ARCHITECTURES`): `topk` (OpenAI's TopK SAE, the paper's). A new
    kind is a `SparseAutoencoder` subclass plus its trainer; statistics and steering use any."""
    expansion: Annotated[int, Field(ge=1)] = 8
    """Number of latents as a multiple of the embedding width D (paper: 8 x 384 = 3072)."""
    n_latents: Annotated[int, Field(ge=1)] | None = None
    """Explicit number of latents; overrides `expansion` when set."""
    k: Annotated[int, Field(ge=1)] = 32
    """Active latents per sample (ours; OpenAI uses 32, SAELens 100)."""
    epochs: Annotated[int, Field(ge=1)] = 100
    """Passes over the training embeddings (paper: 100)."""
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Samples per optimisation step."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Adam learning rate after warmup (constant afterwards)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    """Linear learning-rate warmup, in steps."""
    aux_coef: Annotated[float, Field(ge=0)] = 1 / 32
    """AuxK loss coefficient (OpenAI: 1/32; 0 disables)."""
    k_aux: Annotated[int, Field(ge=1)] | None = None
    """Dead latents used by the AuxK loss; null means D / 2."""
    dead_window: Annotated[int, Field(ge=1)] | None = None
    """A latent is dead after this many samples without firing; null means one epoch."""
    b_dec_init: Literal["geometric_median", "mean"] = "geometric_median"
    """Initial decoder bias, computed on a sample of the training embeddings."""
    normalize_input: bool = True
    """Scale inputs by one constant so that their mean squared norm is D (ours; the constant is
    stored with the SAE and folded back, so encode/decode work on raw embeddings)."""
    seed: int = 0
    """Seed of initialisation and shuffling."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    threads: Annotated[int, Field(ge=1)] | None = 1
    """CPU threads for SAE training; null keeps torch's default. The SAE's matrices are small,
    so extra threads mostly add synchronisation: measured on 2 cores, the demo SAE took 20 s of
    CPU with 1 thread and 122 s with 2."""

    @model_validator(mode="after")
    def _consistent(self) -> SaeParams:
        # With `expansion` the width depends on D, checked when the embeddings are read.
        if self.n_latents is not None and self.k > self.n_latents:
            raise ValueError(f"k {self.k} must be <= n_latents {self.n_latents}")
        if self.n_latents is not None and self.k_aux is not None and self.k_aux > self.n_latents:
            raise ValueError(f"k_aux {self.k_aux} must be <= n_latents {self.n_latents}")
        return self


# -------------------------------------------------------------------------------------- stats
class StatsParams(Section):
    """`latent_stats`: which latents fire for which class."""

    top_k: Annotated[int, Field(ge=1)] = 16
    """Size of the most-frequent latent sets (one global, one per class)."""
    related: Annotated[int, Field(ge=1)] = 3
    """For each class, how many most-overlapping classes to list."""
    batch_size: Annotated[int, Field(ge=1)] = 4096
    """Embeddings encoded per step."""


# ---------------------------------------------------------------------------------- interpret
class InterpretParams(Section):
    """`interpret`: what each latent responds to and which heads it moves."""

    top_n: Annotated[int, Field(ge=1)] = 16
    """Images kept per latent in its gallery: the training images it activates most on."""
    batch_size: Annotated[int, Field(ge=1)] = 4096
    """Embeddings encoded per step of the streaming pass."""
    grid_latents: Annotated[int, Field(ge=1)] = 16
    """Latents of the global set drawn in metrics/plots/latent_grid.png (most frequent first)."""
    grid_images: Annotated[int, Field(ge=1)] = 8
    """Thumbnails per latent in the grids and the class cards (at most `top_n`)."""
    card_latents: Annotated[int, Field(ge=1)] = 3
    """Latents shown per class card in the report: the class set's most frequent."""
    baseline_seed: int = 0
    """Seed of the random directions and of their pairing with SAE latents' firing rates
    (the purity baselines)."""

    @model_validator(mode="after")
    def _grid_within_gallery(self) -> InterpretParams:
        if self.grid_images > self.top_n:
            raise ValueError(f"interpret.grid_images ({self.grid_images}) must be <= interpret.top_n ({self.top_n})")
        return self


# -------------------------------------------------------------------------------------- steer
class SteerParams(Section):
    """`steer`: amplify latent sets and measure accuracy and final-block head usage."""

    strategies: list[str] = ["per_class", "per_class_predicted", "global", "random", "random_per_class"]
    """Which latent sets to steer, by name in `pipeline.strategies.STRATEGIES`: `per_class` (the
    true class's set, an oracle), `per_class_predicted` (the set of the class the unsteered model
    predicts: deployable), `global` (the global set), `random` / `random_per_class` (random sets
    of the global set's / the class set's size: the nulls). Unknown names: exit 2."""
    alphas: list[float] = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0]
    """Steering strengths; 0 is the unsteered baseline and is always evaluated."""
    mode: Literal["scale", "add"] = "scale"
    """`scale`: z_j -> (1 + alpha) z_j; `add`: z_j -> z_j + alpha * (mean active value of j)."""
    keep_error: bool = True
    """True: x' = x + W_dec (z' - z) keeps the SAE's reconstruction error; false: x' = dec(z')."""
    null_draws: Annotated[int, Field(ge=1)] = 20
    """Seeded random latent sets per random strategy: the null distribution a class set's (or
    the global set's) effect is compared with."""
    accuracy_tolerance: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Headline rule: per class, the alpha with the lowest head usage whose accuracy is at least
    the unsteered accuracy minus this."""
    select_on: Literal["val", "test"] = "val"
    """Split on which the headline rule chooses each class's alpha; the headline is always
    reported on test. `test` chooses and reports on the same images (selection inflates it)."""
    bootstrap: Annotated[int, Field(ge=0)] = 1000
    """Bootstrap resamples (images resampled within each class, seeded by `seed`) for the
    intervals of the headline and the strategy curves; 0 reports no intervals."""
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    """Coverage of the bootstrap intervals and of the null's central interval."""
    top_classes: Annotated[int, Field(ge=1)] = 5
    """Classes listed in the headline (largest usage reduction first)."""
    head_index_base: Literal[0, 1] = 0
    """Printed head numbering: 0 gives h0..h(H-1), 1 gives h1..hH."""
    batch_size: Annotated[int, Field(ge=1)] = 256
    """Test images per batch."""
    seed: int = 0
    """Seed of the random latent sets."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    heads: HeadPath = "auto"
    """How the sweep runs the gated blocks (as `extract.heads`); recorded in the details."""

    @model_validator(mode="after")
    def _consistent(self) -> SteerParams:
        if not self.strategies:
            raise ValueError("strategies must name at least one of per_class, global, random")
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies has duplicates: {self.strategies}")
        if not self.alphas:
            raise ValueError("alphas must hold at least one value")
        if len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas has duplicates: {self.alphas}")
        if self.mode == "scale" and min(self.alphas) < -1:
            raise ValueError(f"mode 'scale' needs alphas >= -1 (-1 ablates), got {min(self.alphas)}")
        return self


# --------------------------------------------------------------------------------------- root
class Params(Section):
    """The whole `params.yaml`: one section per stage."""

    data: DataParams
    model: ModelParams
    finetune: FinetuneParams
    extract: ExtractParams
    sae: SaeParams
    stats: StatsParams
    interpret: InterpretParams
    steer: SteerParams

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.steer.select_on == "val" and self.data.val_per_class == 0:
            raise ValueError("steer.select_on 'val' needs a validation split: set data.val_per_class > 0, or select_on 'test'")
        return self


def _type_name(annotation: object) -> str:
    """A readable type for the parameter table: `int or null`, `one of 'scale', 'add'`, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def describe_params() -> str:
    """Every section and field with its type, default and documentation (Markdown)."""

    def walk(model: type[BaseModel], prefix: str, lines: list[str]) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if prefix:
                    lines.append(f"| `{key}` | section | | {field.description or ''} |")
                walk(annotation, key, lines)
                continue
            kind = _type_name(annotation)
            default = "required" if field.is_required() else repr(field.default)
            lines.append(f"| `{key}` | {kind} | `{default}` | {(field.description or '').replace(chr(10), ' ')} |")

    out = []
    for section, field in Params.model_fields.items():
        model = field.annotation
        out += [f"### `{section}`", "", (model.__doc__ or "").strip(), "", "| key | type | default | meaning |", "|---|---|---|---|"]
        walk(model, section, out)
        out.append("")
    return "\n".join(out)


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: missing (this section or key is required)"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (value {error['input']!r}); check the spelling"
    if isinstance(error["input"], dict):  # a cross-field check: the reason names the keys
        return f"{where}: {message}"
    return f"{where} = {error['input']!r}: {message}"


def parse_params(raw: object, source: str = "params") -> Params:
    """Validate an already-loaded mapping; raise ParamsError with a one-paragraph message."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors(include_url=False)]
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise ParamsError(f"invalid parameters in {source}: {shown}") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamsError(f"cannot read parameter file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_params(raw, str(path))
