"""Run configuration: frozen dataclasses loaded from TOML plus ``--section.key=value``.

Every field has a docstring (the string literal under it); ``distgraft train --help``
prints them. Validation happens here, before any process group exists, so that a typo
costs the user one second and exit code 2 instead of a half-started cluster job.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomllib

__all__ = [
    "Config",
    "ConfigError",
    "RunConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "GraftConfig",
    "CompressConfig",
    "RegularizeConfig",
    "DistillConfig",
    "TelemetryConfig",
    "DistConfig",
    "load_config",
    "config_from_toml",
    "to_toml",
    "field_docs",
    "check_run_dir",
    "PER_NODE",
    "agreement_view",
    "describe_disagreement",
]


class ConfigError(ValueError):
    """A config value is invalid; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs"
    """Parent folder of run folders."""
    name: str = "default"
    """Run name; outputs go to DIR/NAME (config.toml, metrics.jsonl, net{k}/)."""
    seed: int = 0
    """Base seed; network k uses seed + 1000 * k for init and data order."""
    epochs: int = 200
    """Number of training epochs."""
    resume: bool = True
    """Continue from the latest epoch that every network completed, if checkpoints exist."""
    eval_every: int = 1
    """Evaluate on the test split every this many epochs (and always at the last)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet32"
    """resnet20/32/56/110 (+ _leaky), mobilenetv2, vgg16_bn, vgg16_li, digits_cnn,
    lenet300_100, lenet5, or torchvision:ARCH."""
    channels_last: bool = True
    """Keep conv weights and activations in channels_last (NHWC): faster on GPUs and CPUs."""
    compile: bool = False
    """Wrap the model in torch.compile (first epoch pays the compile time)."""
    init: str = ""
    """Start from this checkpoint (plain, pruned, decomposed or sparse); '{network}' in the
    path becomes the network's index. Its architecture is kept: a pruned network stays
    pruned. Its base model must be model.name."""
    width: float = 1.0
    """Width multiplier of the CIFAR ResNets and mobilenetv2: every conv's filter count x
    width (ResNets: rounded, at least 1, so 0.5 gives 8/16/32 filters per stage; mobilenetv2:
    rounded to a multiple of 8 as in its paper, the last 1280-wide conv never narrower).
    Recorded in every checkpoint; the other models take 1 only."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "cifar10"
    """digits | cifar10 | cifar100 | fashion-mnist | imagenet | synthetic."""
    root: str = ""
    """Folder holding the dataset, a per-machine setting: torchvision's layout for CIFAR,
    train/ and val/ for ImageNet, the four *-ubyte.gz IDX files for Fashion-MNIST. Empty:
    the dataset's default, 'data' for CIFAR and ImageNet, /usr/share/datasets/fashion-mnist
    (Debian's dataset-fashion-mnist, installed by make data) for Fashion-MNIST."""
    cache: str = ""
    """Writable folder for files derived from the dataset (Fashion-MNIST decompressed, in
    torchvision's FashionMNIST/raw layout), a per-machine setting. Empty:
    $XDG_CACHE_HOME/distgraft, else ~/.cache/distgraft. Processes starting at once share it
    safely (one locked, atomic decompression)."""
    download: bool = False
    """Download CIFAR into root when missing (never done silently)."""
    batch_size: int = 128
    """Per-process training batch size (the reference code's 128)."""
    test_batch_size: int = 1000
    """Evaluation batch size."""
    val_size: int = -1
    """Training images held out for validation (seeded by run.seed: the same for every
    network); best.pt and every pruning decision use them, never the test split. -1: the
    dataset's default (a tenth of the training images, at most 5000 for CIFAR and
    Fashion-MNIST and 10000 for ImageNet); 0: none (best.pt then follows test accuracy,
    the paper's optimistic convention)."""
    augment: bool = True
    """Random crop (zero padding 4 for CIFAR, 2 for Fashion-MNIST, 1 for digits) and
    horizontal flip (not for digits); random-resized crop and flip for ImageNet."""
    workers: int = 8
    """DataLoader worker processes (ImageNet only; the other datasets live on the device)."""
    image_size: int = 224
    """ImageNet training crop size."""
    synthetic_shape: tuple[int, ...] = (3, 32, 32)
    """Image shape of the synthetic dataset (C, H, W)."""
    synthetic_train: int = 2048
    """Number of synthetic training images."""
    synthetic_test: int = 512
    """Number of synthetic test images."""
    synthetic_classes: int = 10
    """Number of synthetic classes."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1
    """Base learning rate of SGD."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    nesterov: bool = False
    """Nesterov momentum."""
    schedule: str = "step"
    """step (x gamma at milestones) | cosine (annealed per iteration to 0) | constant (the
    fine-tuning of pruned networks, Li et al.)."""
    milestones: tuple[int, ...] = ()
    """Epochs at which the step schedule multiplies lr by gamma; empty: every 60 epochs."""
    gamma: float = 0.1
    """Step schedule factor."""
    difflr: bool = False
    """Network i of N starts at lr * (1 + cos(pi * (N - i) / N)) / 2 (diversity trick)."""
    amp: bool = False
    """bfloat16 autocast on CUDA (ignored on CPU)."""


@dataclass(frozen=True)
class GraftConfig:
    source: str = "external"
    """external (ring of networks) | noise | internal | none (baseline: no grafting)."""
    criterion: str = "entropy"
    """entropy (histogram entropy of the weights) | l1 (mean absolute weight)."""
    level: str = "layer"
    """layer (one alpha per layer, the paper) | filter (one alpha per output filter)."""
    a: float = 0.4
    """alpha = a/pi * arctan(c * (H_self - H_peer)) + 0.5 lies in (0.5 - a/2, 0.5 + a/2)."""
    c: float = 500.0
    """Slope of the arctan; 500 reproduces the paper (saturates), 1 is smoother."""
    bins: int = 10
    """Histogram bins for the entropy criterion."""
    every: int = 1
    """Graft every this many epochs (after the epoch's training)."""
    networks: int = 0
    """Number of networks N; 0 means one per process (world size). Replicas = world / N."""
    wire_dtype: str = "float32"
    """float32 | bfloat16: dtype of floating tensors on the wire (bf16 halves the bytes)."""
    gamma: float = 0.1
    """noise/internal sources: filters with L1 norm below gamma are invalid and get scions."""
    a_noise: float = 0.9
    """noise source: sigma_t = a_noise ** epoch."""
    allow_mixed_pruning: bool = False
    """Graft networks whose model.init checkpoints were pruned differently (other kept
    channels, same shapes): the ring then mixes filters that do not correspond. Off: such a
    start stops with exit code 2."""


@dataclass(frozen=True)
class TelemetryConfig:
    console: bool = True
    """Print a line per network per epoch and the final table."""
    zmq: bool = True
    """Push events to the collector (rank 0) for `distgraft monitor`."""
    address: str = "tcp://127.0.0.1:0"
    """Where the collector receives events (PULL): tcp://HOST:PORT (HOST an address or
    interface of rank 0's machine, * for all; port 0 picks a free port) or ipc://PATH."""
    publish: str = "tcp://127.0.0.1:5558"
    """Where the collector republishes events for monitors (PUB), same forms; the next free
    port of the 20 above if taken; empty: no publishing."""
    max_message_bytes: int = 1 << 20
    """Messages larger than this are dropped by the collector."""
    auth: str = "curve"
    """curve: only the run's processes may publish to the collector (per-run CURVE keys,
    RUN_DIR/telemetry.key); none: any process that reaches telemetry.address may."""
    tensorboard: str | bool = "auto"
    """auto | true | false: each network's lead writes TensorBoard files to RUN_DIR/tb/net{k}
    (auto: when the tensorboard package is installed; true without it: one warning)."""


@dataclass(frozen=True)
class CompressConfig:
    method: str = "none"
    """none | magnitude: prune small weights while training, round by round (Han et al. 2015)."""
    schedule: tuple[float, ...] = ()
    """magnitude: each round's sparsity of every pruned layer, e.g. [0.5, 0.75, 0.9]."""
    quality: tuple[float, ...] = ()
    """magnitude, instead of schedule: each round's threshold is quality x std of the layer's
    weights (Han's rule), e.g. [0.5, 1.0, 1.5]."""
    start_epoch: int = 0
    """Epoch at whose start the first round prunes (0: the starting weights, e.g. model.init)."""
    round_epochs: int = 1
    """Epochs of retraining after a round before the next one prunes more."""
    scope: str = "layer"
    """layer: every layer pruned to the target by its own threshold (Han et al.); global: one
    threshold over all pruned weights, so large redundant layers give up more."""
    layers: str = "conv+linear"
    """Weights magnitude pruning touches: conv | linear | conv+linear (biases never)."""
    skip_first: bool = True
    """Leave the first conv alone (Han et al. find it the most sensitive layer)."""
    skip: tuple[str, ...] = ()
    """Layers never pruned (module names, e.g. [fc3])."""
    layer_sparsity: tuple[str, ...] = ()
    """magnitude with schedule: a final sparsity of its own for some layers, e.g.
    ["fc1=0.85", "fc2=0.95"]; their rounds follow the schedule scaled by final / last entry
    (Han et al. prune each layer to its own rate: the big redundant ones further)."""
    rescale_dropout: bool = True
    """After each round set every dropout to D_o * sqrt(C_r / C_o) (Han et al. 3.1)."""


@dataclass(frozen=True)
class RegularizeConfig:
    force: str = "none"
    """none | degradation | constant | linear | gravity: Force Regularization (Wen et al. 2017)
    pulls the filters of each layer towards each other so low-rank approximation cuts more."""
    force_decay: float = 0.0
    """lambda_s: training subtracts force_decay x the force from the gradient."""
    force_layers: str = "conv"
    """conv | conv+linear: the layers whose filters attract each other."""


@dataclass(frozen=True)
class DistillConfig:
    teachers: tuple[str, ...] = ()
    """Checkpoints of frozen teachers (any distgraft writes: plain, pruned, decomposed,
    sparse): every step each network also learns their softened outputs (cultivation, Meng et
    al. 2020 sec. 3.5, when the networks graft). '{network}' in a path becomes the index."""
    tau: float = 2.0
    """Temperature of the distillation term (the paper's 2)."""
    weight: float = 1.0
    """L = CE + weight * tau^2 * softCE(student / tau, teachers / tau) (the paper: 1)."""
    combine: str = "probs"
    """probs: average the teachers' softened probabilities (the paper) | logits: average
    their logits, then soften."""
    mutual: bool = False
    """Deep Mutual Learning (Zhang et al. 2018): every step each network also learns the
    other networks' outputs on the same batch (data order and augmentation then come from
    run.seed, shared by all networks; initialisation and dropout stay per network)."""
    mutual_weight: float = 1.0
    """Weight of the mean over peers of KL(p_peer || p_own)."""


@dataclass(frozen=True)
class DistConfig:
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""
    timeout_s: float = 300.0
    """Every blocking collective or P2P wait fails after this many seconds, naming the peer."""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    graft: GraftConfig = field(default_factory=GraftConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def milestones(self) -> tuple[int, ...]:
        """The step schedule's milestones, defaulting to every 60 epochs."""
        if self.optim.milestones:
            return self.optim.milestones
        return tuple(range(60, self.run.epochs, 60))


SECTIONS = {f.name: f.type for f in fields(Config)}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("digits", "cifar10", "cifar100", "fashion-mnist", "imagenet", "synthetic"),
    "optim.schedule": ("step", "cosine", "constant"),
    "graft.source": ("external", "noise", "internal", "none"),
    "graft.criterion": ("entropy", "l1"),
    "graft.level": ("layer", "filter"),
    "graft.wire_dtype": ("float32", "bfloat16"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "compress.method": ("none", "magnitude"),
    "compress.layers": ("conv", "linear", "conv+linear"),
    "compress.scope": ("layer", "global"),
    "regularize.force": ("none", "degradation", "constant", "linear", "gravity"),
    "regularize.force_layers": ("conv", "conv+linear"),
    "distill.combine": ("probs", "logits"),
    "telemetry.auth": ("curve", "none"),
}


def _section_classes() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def field_docs() -> dict[str, str]:
    """'section.key' -> docstring, read from this file's source (for --help)."""
    import inspect

    docs: dict[str, str] = {}
    for section, cls in _section_classes().items():
        lines = inspect.getsource(cls).splitlines()
        for i, line in enumerate(lines[:-1]):
            stripped = line.strip()
            if ":" in stripped and not stripped.startswith(("@", "class", '"""', "#")):
                key = stripped.split(":", 1)[0]
                if lines[i + 1].strip().startswith('"""'):
                    docs[f"{section}.{key}"] = _docstring_at(lines, i + 1)
    return docs


def _docstring_at(lines: list[str], start: int) -> str:
    """The (possibly multi-line) string literal starting at ``lines[start]``, joined."""
    parts = []
    for line in lines[start:]:
        parts.append(line.strip())
        if line.strip().endswith('"""') and (len(parts) > 1 or line.strip().count('"""') == 2):
            break
    return " ".join(parts).strip('"').strip()


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or raise ConfigError."""
    origin = get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip()
            value = [] if text in ("", "[]", "()") else text.strip("[]()").split(",")
        item = get_args(typ)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r}: expected a list of {item.__name__} values")
        return tuple(_coerce(key, v.strip() if isinstance(v, str) else v, item) for v in value)
    if set(get_args(typ)) == {str, bool}:  # "auto" | true | false
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return _coerce(key, value, bool)
        except ConfigError:
            raise ConfigError(f"{key} = {value!r}: expected auto, true or false") from None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} = {value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} = {value!r}: expected an integer")
    if typ is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key} = {value!r}: expected a finite number")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} = {value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _parse_cli_value(text: str) -> Any:
    """Command-line values are typed by the field; TOML-ish lists are accepted too."""
    try:
        return ast.literal_eval(text) if text[:1] in "[(" else text
    except (ValueError, SyntaxError):
        return text


def _build(tree: dict[str, dict[str, Any]]) -> Config:
    classes = _section_classes()
    sections = {}
    for name, values in tree.items():
        if name not in classes:
            raise ConfigError(
                f"unknown config section [{name}]; allowed sections: {', '.join(classes)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"[{name}] must be a table of key = value")
        cls = classes[name]
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown config key {name}.{key}; allowed keys in [{name}]: {', '.join(hints)}"
                )
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        sections[name] = cls(**kwargs)
    return Config(**sections)


def _merge(tree: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    if "." not in key:
        raise ConfigError(f"override {key!r} must look like --section.key=value")
    section, name = key.split(".", 1)
    tree.setdefault(section, {})[name] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (optional), apply ``section.key=value`` overrides, validate."""
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {str(p)!r} is not UTF-8 text (byte {e.start}); TOML files are UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from e
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(
                    f"{p}: top-level key {section!r} must be a [section] table; "
                    f"allowed sections: {', '.join(SECTIONS)}"
                )
            for key, value in values.items():
                _merge(tree, f"{section}.{key}", value)
    for item in overrides or []:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r} must look like --section.key=value")
        key, value = text.split("=", 1)
        _merge(tree, key, _parse_cli_value(value))
    cfg = _build(tree)
    validate(cfg)
    return cfg


def config_from_toml(text: str, overrides: list[str] | None = None) -> Config:
    """A validated config from TOML text (e.g. the one a checkpoint stores) plus overrides."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"stored config is not valid TOML: {e}") from e
    tree: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        for key, value in (values if isinstance(values, dict) else {}).items():
            _merge(tree, f"{section}.{key}", value)
    for item in overrides or []:
        key, _, value = (item[2:] if item.startswith("--") else item).partition("=")
        _merge(tree, key, _parse_cli_value(value))
    cfg = _build(tree)
    validate(cfg)
    return cfg


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check every value; with ``world_size``, also the networks x replicas layout."""
    from distgraft.models import MODEL_NAMES, WIDTH_MODELS, is_known_model

    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in allowed, key, value, f"allowed values are {', '.join(allowed)}")
    _require(
        is_known_model(cfg.model.name),
        "model.name",
        cfg.model.name,
        f"use one of {', '.join(MODEL_NAMES)}, or torchvision:ARCH with a torchvision "
        "classification architecture",
    )
    w = cfg.model.width
    _require(w > 0 and math.isfinite(w), "model.width", w, "must be a number > 0")
    _require(w == 1 or cfg.model.name in WIDTH_MODELS, "model.width", w,
             f"{cfg.model.name} takes width 1 only; a width multiplier applies to "
             f"{', '.join(WIDTH_MODELS)}")  # fmt: skip
    g, o, r, d = cfg.graft, cfg.optim, cfg.run, cfg.data
    _require(g.a > 0 and g.a < 1, "graft.a", g.a, "must be in (0, 1) so alpha stays in (0, 1)")
    _require(g.c > 0 and math.isfinite(g.c), "graft.c", g.c, "must be a positive number")
    _require(g.bins >= 2, "graft.bins", g.bins, "must be >= 2")
    _require(g.every >= 1, "graft.every", g.every, "must be >= 1")
    _require(g.networks >= 0, "graft.networks", g.networks, "must be >= 0 (0: world size)")
    _require(g.gamma >= 0, "graft.gamma", g.gamma, "must be >= 0")
    _require(0 < g.a_noise < 1, "graft.a_noise", g.a_noise, "must be in (0, 1)")
    _require(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(0 < o.gamma <= 1, "optim.gamma", o.gamma, "must be in (0, 1]")
    _require(all(m > 0 for m in o.milestones), "optim.milestones", o.milestones, "must be > 0")
    _require(r.epochs >= 1, "run.epochs", r.epochs, "must be >= 1")
    _require(r.eval_every >= 1, "run.eval_every", r.eval_every, "must be >= 1")
    _require(bool(r.name) and "/" not in r.name, "run.name", r.name, "a non-empty folder name")
    _require(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _require(d.test_batch_size >= 1, "data.test_batch_size", d.test_batch_size, "must be >= 1")
    _require(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _require(d.val_size >= -1, "data.val_size", d.val_size, "must be >= 0, or -1 (default)")
    _require(
        len(d.synthetic_shape) == 3 and all(s > 0 for s in d.synthetic_shape),
        "data.synthetic_shape",
        d.synthetic_shape,
        "must be three positive integers [C, H, W]",
    )
    _require(d.synthetic_classes >= 2, "data.synthetic_classes", d.synthetic_classes, ">= 2")
    _require(cfg.dist.timeout_s > 0, "dist.timeout_s", cfg.dist.timeout_s, "must be > 0")
    _validate_endpoint("telemetry.address", cfg.telemetry.address, allow_empty=False)
    _validate_endpoint("telemetry.publish", cfg.telemetry.publish, allow_empty=True)
    _require(
        cfg.telemetry.max_message_bytes >= 1024,
        "telemetry.max_message_bytes",
        cfg.telemetry.max_message_bytes,
        "must be >= 1024",
    )
    _validate_compress(cfg)
    f = cfg.regularize
    _require(f.force_decay >= 0 and math.isfinite(f.force_decay), "regularize.force_decay",
             f.force_decay, "must be a number >= 0")  # fmt: skip
    _require(f.force == "none" or f.force_decay > 0, "regularize.force_decay", f.force_decay,
             f"must be > 0 with regularize.force = {f.force!r}")  # fmt: skip
    k = cfg.distill
    _require(k.tau > 0, "distill.tau", k.tau, "must be > 0")
    _require(k.weight >= 0, "distill.weight", k.weight, "must be >= 0")
    _require(k.mutual_weight >= 0, "distill.mutual_weight", k.mutual_weight, "must be >= 0")
    _require(all(bool(t) for t in k.teachers), "distill.teachers", k.teachers,
             "every entry must be a checkpoint path")  # fmt: skip
    if world_size is not None:
        n = g.networks or world_size
        _require(
            n <= world_size and world_size % n == 0,
            "graft.networks",
            g.networks,
            f"must divide the world size {world_size} (replicas = world size / networks)",
        )


# tcp://HOST:PORT with HOST a name, an IPv4 address, * or a bracketed IPv6 address; the
# short forms PORT, :PORT and HOST:PORT mean tcp:// (on 127.0.0.1 without a host).
_TCP = re.compile(r"(?:tcp://)?(?P<host>[\w.\-*%]*|\[[0-9A-Fa-f:.%\w]+\]):(?P<port>\d{1,5})")


def _validate_endpoint(key: str, address: str, allow_empty: bool) -> None:
    """The syntax of a ZeroMQ endpoint; what only a bind can tell is checked on rank 0
    before the run starts (``telemetry.preflight``)."""
    text = address.strip()
    if allow_empty and not text:
        return
    if text.startswith("ipc://"):
        ok = len(text) > len("ipc://")
    else:
        match = _TCP.fullmatch(text if not text.isdigit() else f":{text}")
        ok = match is not None and int(match["port"]) <= 65535
    _require(ok, key, address, "use tcp://HOST:PORT (HOST an address or interface of this "
             "machine, or * for all; PORT 0 to 65535, 0: any free port) or ipc://PATH"
             + (", or an empty string for none" if allow_empty else ""))  # fmt: skip


def _validate_compress(cfg: Config) -> None:
    c = cfg.compress
    if c.method == "none":
        return
    _require(bool(c.schedule) != bool(c.quality), "compress.schedule", c.schedule,
             "give exactly one of compress.schedule (sparsities) and compress.quality")  # fmt: skip
    _require(all(0 <= s < 1 for s in c.schedule), "compress.schedule", c.schedule,
             "every sparsity must be in [0, 1)")  # fmt: skip
    _require(all(q >= 0 and math.isfinite(q) for q in c.quality), "compress.quality", c.quality,
             "every quality must be a number >= 0")  # fmt: skip
    _require(c.round_epochs >= 1, "compress.round_epochs", c.round_epochs, "must be >= 1")
    _validate_layer_sparsity(c)
    rounds = len(c.schedule or c.quality)
    last = c.start_epoch + (rounds - 1) * c.round_epochs
    _require(c.start_epoch >= 0 and last < cfg.run.epochs, "compress.start_epoch",
             c.start_epoch, f"the last of {rounds} rounds (epoch {last}) must come before "
             f"run.epochs = {cfg.run.epochs}")  # fmt: skip


def layer_sparsity(c: CompressConfig) -> dict[str, float]:
    """compress.layer_sparsity as {layer: final sparsity} (ValueError on a malformed entry)."""
    out = {}
    for item in c.layer_sparsity:
        name, sep, value = str(item).partition("=")
        name = name.strip().removesuffix(".weight")
        try:
            sparsity = float(value)
        except ValueError:
            sparsity = math.nan
        if not (sep and name and 0 <= sparsity < 1):
            raise ValueError(f"{item!r} is not LAYER=SPARSITY with a sparsity in [0, 1)")
        out[name] = sparsity
    return out


def _validate_layer_sparsity(c: CompressConfig) -> None:
    if not c.layer_sparsity:
        return
    try:
        finals = layer_sparsity(c)
    except ValueError as e:
        raise ConfigError(f"compress.layer_sparsity: {e}, e.g. [\"fc1=0.85\"]") from None
    key = "compress.layer_sparsity"
    _require(bool(c.schedule) and c.schedule[-1] > 0, key, c.layer_sparsity,
             "needs compress.schedule ending above 0 (rounds scale it)")  # fmt: skip
    _require(c.scope == "layer", key, c.layer_sparsity,
             "needs compress.scope = \"layer\" (global uses one threshold)")  # fmt: skip
    top = max(c.schedule) / c.schedule[-1]
    worst = max(finals.values()) * top
    _require(worst < 1, key, c.layer_sparsity,
             f"a round would prune {worst:.0%} of a layer (the schedule peaks at {top:.2f}x"
             " its last entry)")  # fmt: skip


PER_NODE: tuple[str, ...] = ("telemetry.*", "data.root", "data.workers", "data.cache", "run.dir")
"""Settings that may differ between the ranks of one run: where a node finds its files and
what it spends on loading them, and its own telemetry. Every other setting must be the same
on every rank (a per-node override gone wrong ends otherwise in a crash inside gloo or a
hang); the ranks compare them at start-up and stop with exit code 2 naming the keys."""


def _per_node(key: str) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in PER_NODE)


def agreement_view(cfg: Config) -> dict[str, str]:
    """Every setting that must agree across ranks, as key -> its TOML value."""
    return {
        f"{section}.{key}": _toml_value(value)
        for section in SECTIONS
        for key, value in dataclasses.asdict(getattr(cfg, section)).items()
        if not _per_node(f"{section}.{key}")
    }


def describe_disagreement(views: list[dict[str, str]]) -> str:
    """One line naming each setting the ranks disagree on and its value on each side."""
    keys = sorted({k for v in views for k in v if len({w.get(k) for w in views}) > 1})
    parts = []
    for key in keys:
        ranks: dict[str, list[int]] = {}
        for rank, view in enumerate(views):
            ranks.setdefault(view.get(key, "(unset)"), []).append(rank)
        sides = "; ".join(f"{value} on {_ranks(r)}" for value, r in ranks.items())
        parts.append(f"{key} = {sides}")
    return (
        f"the ranks of this run were started with different settings: {' | '.join(parts)}. "
        f"Every setting except {', '.join(PER_NODE)} must be the same on every rank"
    )


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def check_run_dir(cfg: Config) -> None:
    """Pre-flight: the run folder exists or can be made, and is writable (ConfigError).

    Checked before any process starts, so that a typo in run.dir costs a second, not a
    cluster job that trains an epoch and then cannot save it.
    """
    import tempfile

    parent, folder = Path(cfg.run.dir), cfg.run_dir
    for path, key, what in ((parent, "run.dir", cfg.run.dir), (folder, "run.name", cfg.run.name)):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key} = {what!r}: {str(path)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(
            f"run.dir = {cfg.run.dir!r}: cannot write the run folder {str(folder)!r} "
            f"({e.strerror or e}); choose a writable run.dir"
        ) from None


def with_overrides(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with some fields of some sections replaced (for tests, benches)."""
    return replace(cfg, **{s: replace(getattr(cfg, s), **vals) for s, vals in sections.items()})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (written to the run folder; loadable with --config)."""
    out = []
    for section in SECTIONS:
        out.append(f"[{section}]")
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            out.append(f"{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)
