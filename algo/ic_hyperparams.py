"""Hyperparameters of SageMaker's built-in image-classification algorithm: names, defaults and validation.

Plain Python (no MXNet), so the trainer can reject a bad job in milliseconds. SageMaker passes every value as a
string in `input/config/hyperparameters.json`; `parse` turns them into a typed `Hyperparameters` or raises
`HyperparameterError` with a message in the built-in's manner (the name, the value, what is valid).

Names, defaults and ranges follow the AWS page "Image Classification Hyperparameters". Accepted but without effect
here (`IGNORED`): `kv_store` (distributed training only) and `precision_dtype=float16` (MXNet has no float16
training on CPU; the job trains in float32 and says so in the log). `use_pretrained_model=1` is rejected: the
built-in downloads ImageNet weights that do not exist locally, and training from scratch instead would silently
give a different model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

IMAGENET_DEPTHS = (18, 34, 50, 101, 152, 200)
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
OPTIMIZERS = ("sgd", "adam", "rmsprop", "nag")
AUGMENTATIONS = ("crop", "crop_color", "crop_color_transform")
IGNORED = ("kv_store", "precision_dtype=float16")


class HyperparameterError(ValueError):
    """A hyperparameter is unknown, missing or out of range; the message says which and what is valid."""


@dataclass(frozen=True)
class Hyperparameters:
    """Typed hyperparameters with the built-in algorithm's defaults (None: no default, feature off)."""

    num_classes: int
    num_training_samples: int
    augmentation_type: str | None = None
    beta_1: float = 0.9
    beta_2: float = 0.999
    checkpoint_frequency: int | None = None
    early_stopping: bool = False
    early_stopping_min_epochs: int = 10
    early_stopping_patience: int = 5
    early_stopping_tolerance: float = 0.0
    epochs: int = 30
    eps: float = 1e-8
    gamma: float = 0.9
    image_shape: tuple[int, int, int] = (3, 224, 224)
    kv_store: str | None = None
    learning_rate: float = 0.1
    lr_scheduler_factor: float = 0.1
    lr_scheduler_step: tuple[int, ...] = ()
    mini_batch_size: int = 32
    momentum: float = 0.9
    multi_label: int = 0
    num_layers: int = 152
    optimizer: str = "sgd"
    precision_dtype: str = "float32"
    resize: int | None = None
    top_k: int | None = None
    use_pretrained_model: int = 0
    use_weighted_loss: int = 0
    weight_decay: float = 0.0001
    ignored: tuple[str, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ignored"}


def _int(name: str, text: str, *, minimum: int = 1, what: str = "a positive integer") -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected {what}") from None
    if value < minimum:
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected {what}")
    return value


def _float01(name: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected a float in [0, 1]") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected a float in [0, 1]")
    return value


def _choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    value = text.strip()
    if value not in choices:
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected one of {', '.join(choices)}")
    return value


def _flag(name: str, text: str) -> int:
    return int(_choice(name, text, ("0", "1")))


def _bool(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected True or False")
    return value == "true"


def _image_shape(name: str, text: str) -> tuple[int, int, int]:
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise HyperparameterError(
            f"hyperparameter {name}={text!r}: expected 'channels,height,width' with 1 or 3 channels, e.g. '3,224,224'"
        )
    return shape  # type: ignore[return-value]


def _epoch_list(name: str, text: str) -> tuple[int, ...]:
    steps = tuple(_int(name, part, what="comma-separated positive epochs, e.g. '10,20'") for part in text.split(","))
    if list(steps) != sorted(set(steps)):
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected increasing epochs, e.g. '10,20'")
    return steps


def _num_layers(name: str, text: str) -> int:
    valid = IMAGENET_DEPTHS + CIFAR_DEPTHS
    value = _int(name, text, what=f"one of {', '.join(map(str, valid))}")
    if value not in valid:
        raise HyperparameterError(f"hyperparameter {name}={text!r}: expected one of {', '.join(map(str, valid))}")
    return value


_PARSERS = {
    "num_classes": _int,
    "num_training_samples": _int,
    "augmentation_type": lambda n, t: _choice(n, t, AUGMENTATIONS),
    "beta_1": _float01,
    "beta_2": _float01,
    "checkpoint_frequency": _int,
    "early_stopping": _bool,
    "early_stopping_min_epochs": _int,
    "early_stopping_patience": _int,
    "early_stopping_tolerance": _float01,
    "epochs": _int,
    "eps": _float01,
    "gamma": _float01,
    "image_shape": _image_shape,
    "kv_store": lambda n, t: _choice(n, t, ("dist_sync", "dist_async")),
    "learning_rate": _float01,
    "lr_scheduler_factor": _float01,
    "lr_scheduler_step": _epoch_list,
    "mini_batch_size": _int,
    "momentum": _float01,
    "multi_label": _flag,
    "num_layers": _num_layers,
    "optimizer": lambda n, t: _choice(n, t, OPTIMIZERS),
    "precision_dtype": lambda n, t: _choice(n, t, ("float32", "float16")),
    "resize": _int,
    "top_k": lambda n, t: _int(n, t, minimum=2, what="an integer greater than 1"),
    "use_pretrained_model": _flag,
    "use_weighted_loss": _flag,
    "weight_decay": _float01,
}
REQUIRED = ("num_classes", "num_training_samples")
KNOWN = tuple(_PARSERS)


def parse(raw: dict[str, object]) -> Hyperparameters:
    """Validate SageMaker-style string hyperparameters and return them typed, with defaults filled in."""
    unknown = sorted(set(raw) - set(_PARSERS))
    if unknown:
        raise HyperparameterError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))}: the image-classification algorithm accepts "
            f"{', '.join(sorted(_PARSERS))}"
        )
    missing = [name for name in REQUIRED if name not in raw]
    if missing:
        raise HyperparameterError(f"missing required hyperparameter(s) {', '.join(missing)}")
    values: dict[str, object] = {}
    for name, text in raw.items():
        if not isinstance(text, str):
            raise HyperparameterError(
                f"hyperparameter {name}={text!r}: SageMaker passes hyperparameters as strings, "
                f"got {type(text).__name__}"
            )
        values[name] = _PARSERS[name](name, text)
    hp = Hyperparameters(**values)  # type: ignore[arg-type]
    _check_combination(hp)
    ignored = [name for name in ("kv_store",) if name in raw]
    if hp.precision_dtype == "float16":
        ignored.append("precision_dtype=float16")
    return Hyperparameters(**{**hp.to_dict(), "ignored": tuple(ignored)})  # type: ignore[arg-type]


def _check_combination(hp: Hyperparameters) -> None:
    if hp.checkpoint_frequency is not None and hp.checkpoint_frequency > hp.epochs:
        raise HyperparameterError(
            f"hyperparameter checkpoint_frequency={hp.checkpoint_frequency}: expected at most epochs={hp.epochs}"
        )
    if hp.multi_label == 0 and hp.use_weighted_loss == 1:
        raise HyperparameterError("hyperparameter use_weighted_loss=1 is used only with multi_label=1")
    if hp.multi_label == 0 and hp.num_classes < 2:
        raise HyperparameterError(f"hyperparameter num_classes={hp.num_classes}: multi-class needs at least 2 classes")
    if hp.top_k is not None and hp.top_k > hp.num_classes:
        raise HyperparameterError(f"hyperparameter top_k={hp.top_k}: expected at most num_classes={hp.num_classes}")
    if hp.use_pretrained_model == 1:
        raise HyperparameterError(
            "hyperparameter use_pretrained_model=1: the local algorithm has no pretrained ImageNet weights; "
            "train from scratch with use_pretrained_model=0 or run the job on SageMaker"
        )
