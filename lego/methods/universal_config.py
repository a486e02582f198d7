"""What the Universal method (`lego.methods.universal`) trains and how it routes: `UniversalConfig`,
`AlphaSchedule` and the named presets.

Layers are numbered from 1 (layer i is `model.blocks[i - 1]`, a one-layer LEGOBlock). Errors are
`ConfigError`s naming the `universal.*` key, so the same checks serve Python users and the Hydra runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from lego.errors import ConfigError
from lego.model import CONFIDENCE_METHODS

SCHEDULE_KINDS = ("linear", "cosine", "step", "constant")


@dataclass
class AlphaSchedule:
    """The weight of layer 1 over training; the last layer gets `1 - alpha`, middle layers 0.

    `alpha` is `start` at epoch 0 and `end` at the last epoch (`max_epochs - 1`): linearly, by cosine
    annealing, or (`step`) in equal drops of `(start - end) / len(steps)` at each epoch listed in `steps`,
    never past `end`. `constant` keeps `start`.
    """

    kind: str = "linear"
    start: float = 0.9
    end: float = 0.5
    steps: list[int] = field(default_factory=lambda: [10, 20])

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"universal.alpha_schedule.kind={self.kind!r} is unknown; use one of {SCHEDULE_KINDS}")
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"universal.alpha_schedule.{name}={getattr(self, name)} must be in [0, 1]")
        if self.kind == "step" and not self.steps:
            raise ConfigError("universal.alpha_schedule.steps is empty: the step schedule needs epochs to drop at")
        self.steps = sorted(int(s) for s in self.steps)

    def get_alpha(self, epoch: int, max_epochs: int) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            drops = sum(epoch >= s for s in self.steps)
            alpha = self.start + (self.end - self.start) * drops / len(self.steps)
            return max(alpha, self.end) if self.start >= self.end else min(alpha, self.end)
        progress = min(1.0, epoch / (max_epochs - 1)) if max_epochs > 1 else 0.0
        if self.kind == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress

    def weights(self, epoch: int, max_epochs: int, num_layers: int) -> dict[int, float]:
        alpha = self.get_alpha(epoch, max_epochs)
        weights = dict.fromkeys(range(1, num_layers + 1), 0.0)
        weights[1] += alpha  # += : with one layer, both ends are layer 1
        weights[num_layers] += 1.0 - alpha
        return weights


def _standard(n: int) -> dict[int, float]:
    return {n: 1.0}


def _lpt(n: int) -> dict[int, float]:
    return dict.fromkeys(range(1, n + 1), 1.0 / n)


def _asymmetric(n: int, a: float = 0.7) -> dict[int, float]:
    return {1: a, n: 1.0 - a}


def _deep_focus(n: int) -> dict[int, float]:
    return {1: 0.3, n: 0.7}


def _l2(n: int, b: float = 0.3) -> dict[int, float]:
    return {1: 0.7, 2: b, n: 0.3}


def _rising(n: int) -> dict[int, float]:
    """LayerSkip's early-exit loss scale (Elhoushi et al., 2024): rising with depth, layer i's weight in proportion
    to i, summing to 1."""
    return {i: i / (n * (n + 1) / 2) for i in range(1, n + 1)}


# Each preset maps the number of layers to layer_weights (missing layers weigh 0). For 3 layers:
# standard {3: 1}, lpt {1: 1/3, 2: 1/3, 3: 1/3}, asymmetric {1: .7, 3: .3}, deep_focus {1: .3, 3: .7},
# l2 {1: .7, 2: .3, 3: .3}, rising {1: 1/6, 2: 2/6, 3: 3/6} (conf/universal/layerskip.yaml).
PRESETS = {
    "standard": _standard, "lpt": _lpt, "asymmetric": _asymmetric, "deep_focus": _deep_focus, "l2": _l2,
    "rising": _rising,
}  # fmt: skip
CURRICULA = ("none", "rotational", "gradual")


@dataclass
class UniversalConfig:
    """Joint training of every layer: `Loss = sum_i layer_weights[i] * L_i` (L_i: layer i's LM loss through
    the shared head), plus the optional exit-classifier, distillation and self-distillation terms.

    Routing at inference is TRUE early exit through the core model. `routing_threshold` is applied at
    `exit_layer` (or per layer with `exit_layers` / `exit_thresholds`) with two end points that do not
    follow `confidence >= threshold` literally: 0 means nobody exits (threshold inf: the deep path),
    1.0 means everybody exits at the exit layer (threshold -inf: the shallow path); anything strictly
    between is the confidence threshold.
    """

    layer_weights: dict[int, float] | None
    routing_threshold: float = 0.95
    exit_layer: int = 1
    alpha_schedule: AlphaSchedule | None = None  # replaces layer_weights every epoch when set
    layer_lr_scales: dict[int, float] | None = None  # lr of layer i = base_lr * scale (embedding/head: base_lr)
    normalize_weights: bool = False  # divide layer_weights by their sum
    confidence_method: str = "max_softmax"  # the documented framework's; "learned" = the core's exit classifier
    exit_layers: list[int] | None = None  # None: [exit_layer]
    exit_thresholds: dict[int, float] | None = None  # per exit layer; missing ones use routing_threshold
    exit_loss_weight: float = 1.0  # BCE of the exit classifiers (trained only for confidence_method=learned)
    teacher: nn.Module | str | None = None  # a trained LEGOTransformer or a model.safetensors of this architecture
    distillation_alpha: float = 0.5  # with a teacher: alpha * task + (1 - alpha) * KL
    distillation_temperature: float = 1.0
    self_distillation: float = 0.0  # weight of KL(final layer -> each exit layer), final layer detached
    weight_decay: float = 0.1
    # LayerSkip-style training (Elhoushi et al., 2024; docs/universal.md): each sequence skips layer i in training
    # with probability layer_dropout * (2^((i-1)/(N-1)) - 1), rising with depth to layer_dropout at the last layer
    layer_dropout: float = 0.0
    # which layers' losses count at a step, the last layer's always: none (all), rotational (every
    # curriculum_period-th layer, the set rotating each step) or gradual (from the last layer down, one more layer
    # every 1/(N-1) of training)
    exit_curriculum: str = "none"
    curriculum_period: int = 2

    def __post_init__(self) -> None:
        self.layer_weights = _int_keys("layer_weights", self.layer_weights)
        self.layer_lr_scales = _int_keys("layer_lr_scales", self.layer_lr_scales)
        self.exit_thresholds = _int_keys("exit_thresholds", self.exit_thresholds)
        if isinstance(self.alpha_schedule, dict):
            known = {f.name for f in fields(AlphaSchedule)}
            unknown = sorted(set(self.alpha_schedule) - known)
            if unknown:
                raise ConfigError(f"universal.alpha_schedule.{unknown[0]} is unknown; use {', '.join(sorted(known))}")
            self.alpha_schedule = AlphaSchedule(**self.alpha_schedule)
        if self.layer_weights is None and self.alpha_schedule is None:
            raise ConfigError("universal.layer_weights is missing: give weights, a preset or an alpha_schedule")
        if self.layer_weights is not None:
            if any(w < 0 for w in self.layer_weights.values()):
                raise ConfigError(f"universal.layer_weights={self.layer_weights} must be non-negative")
            if sum(self.layer_weights.values()) <= 0:
                raise ConfigError("universal.layer_weights must give some layer a positive weight")
        if any(s <= 0 for s in (self.layer_lr_scales or {}).values()):
            raise ConfigError(f"universal.layer_lr_scales={self.layer_lr_scales} must be positive")
        if self.confidence_method not in CONFIDENCE_METHODS:
            raise ConfigError(
                f"universal.confidence_method={self.confidence_method!r} is unknown; use one of {CONFIDENCE_METHODS}"
            )
        for key, value in [("routing_threshold", self.routing_threshold), *self._threshold_items()]:
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"universal.{key}={value} must be in [0, 1] (0: deep path, 1: shallow path)")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ConfigError(f"universal.distillation_alpha={self.distillation_alpha} must be in [0, 1]")
        if self.distillation_temperature <= 0 or self.self_distillation < 0 or self.exit_loss_weight < 0:
            raise ConfigError("universal: distillation_temperature must be positive, the loss weights non-negative")
        self.exit_layers = sorted(int(i) for i in self.exit_layers) if self.exit_layers else [self.exit_layer]
        self._check_layerskip()

    def _check_layerskip(self) -> None:
        if not 0.0 <= self.layer_dropout < 1.0:
            raise ConfigError(f"universal.layer_dropout={self.layer_dropout} must be in [0, 1), e.g. 0.2")
        if self.layer_dropout > 0 and (self.teacher is not None or self.self_distillation > 0):
            raise ConfigError(
                "universal.layer_dropout works without distillation (a skipped layer has no logits to distil); "
                "set universal.layer_dropout=0 or drop the teacher and self_distillation"
            )
        if self.exit_curriculum not in CURRICULA:
            raise ConfigError(f"universal.exit_curriculum={self.exit_curriculum!r} is unknown; use one of {CURRICULA}")
        if self.curriculum_period < 1:
            raise ConfigError(f"universal.curriculum_period={self.curriculum_period} must be at least 1")

    def drop_rates(self, num_layers: int) -> list[float]:
        """Each layer's training skip probability: 0 for the first, rising exponentially to `layer_dropout`."""
        if self.layer_dropout == 0 or num_layers == 1:
            return [0.0] * num_layers
        return [self.layer_dropout * (2 ** (k / (num_layers - 1)) - 1) for k in range(num_layers)]

    def curriculum(self, weights: dict[int, float], step: int, progress: float, num_layers: int) -> dict[int, float]:
        """`weights` with the layers the curriculum leaves out at this step (0-based) and training `progress` (in
        [0, 1]) set to 0; the last layer's loss always counts."""
        if self.exit_curriculum == "none":
            return weights
        if self.exit_curriculum == "rotational":
            on = {i for i in range(1, num_layers) if (i - 1) % self.curriculum_period == step % self.curriculum_period}
        else:  # gradual: the deepest layers first
            on = set(range(num_layers - math.floor(progress * (num_layers - 1)), num_layers))
        return {i: w if i in on or i == num_layers else 0.0 for i, w in weights.items()}

    def _threshold_items(self) -> list[tuple[str, float]]:
        return [(f"exit_thresholds.{i}", t) for i, t in (self.exit_thresholds or {}).items()]

    @classmethod
    def preset(cls, name: str, num_layers: int = 3, **overrides: Any) -> UniversalConfig:
        """A named preset (see `PRESETS`) for a model of `num_layers` layers, e.g. `preset("lpt")`."""
        if name not in PRESETS:
            raise ConfigError(f"universal.preset={name!r} is unknown; use one of: {', '.join(PRESETS)}")
        return cls(PRESETS[name](num_layers), **overrides)

    def check_layers(self, num_layers: int) -> None:
        """Layer numbers must exist in the model; exits must come before the last layer (which always finishes)."""
        for key, layers in [
            ("layer_weights", self.layer_weights or {}),
            ("layer_lr_scales", self.layer_lr_scales or {}),
        ]:
            if any(not 1 <= i <= num_layers for i in layers):
                raise ConfigError(f"universal.{key} has layers {sorted(layers)}; the model has layers 1..{num_layers}")
        exits = set(self.exit_layers) | set(self.exit_thresholds or {})
        if any(not 1 <= i < num_layers for i in exits):
            raise ConfigError(
                f"universal.exit_layers {sorted(exits)} must lie in 1..{num_layers - 1} (the last layer never exits)"
            )

    def exit_threshold(self, layer: int) -> float:
        """The core threshold for an exit layer, with the 0 / 1.0 end points mapped to inf / -inf."""
        value = (self.exit_thresholds or {}).get(layer, self.routing_threshold)
        if value <= 0.0:
            return math.inf
        if value >= 1.0:
            return -math.inf
        return value


def from_dict(node: dict[str, Any], num_layers: int) -> UniversalConfig:
    """The `universal` node of a run config: UniversalConfig's fields plus `preset` (a name in PRESETS),
    which supplies layer_weights unless they are given too."""
    node = dict(node)
    preset = node.pop("preset", None)
    known = {f.name for f in fields(UniversalConfig)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise ConfigError(f"universal.{unknown[0]} is unknown; known keys: preset, {', '.join(sorted(known))}")
    if preset is not None and node.get("layer_weights") is None:
        config = UniversalConfig.preset(preset, num_layers, **{k: v for k, v in node.items() if k != "layer_weights"})
    else:
        config = UniversalConfig(**{"layer_weights": None, **node})
    config.check_layers(num_layers)
    return config


def _int_keys(key: str, mapping: dict | None) -> dict[int, float] | None:
    """YAML and the command line give "1" as often as 1: layer numbers become ints, values floats."""
    if mapping is None:
        return None
    if isinstance(mapping, (list, tuple)):  # [w1, w2, ...] for layers 1..N
        return {i + 1: float(v) for i, v in enumerate(mapping)}
    try:
        return {int(i): float(v) for i, v in dict(mapping).items()}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"universal.{key}={mapping} must map layer numbers (1, 2, ...) to numbers") from err
