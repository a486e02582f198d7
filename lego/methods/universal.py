"""The Universal Training Framework as a method of the package: every layer trained at once on a weighted sum of
per-layer LM losses, then routed with TRUE early exit through the core model.

    from lego.methods.universal import UniversalConfig, UniversalTrainer   # or experiments.universal_trainer

    config = UniversalConfig.preset("asymmetric", routing_threshold=0.95)  # or UniversalConfig({1: .7, 3: .3})
    trainer = UniversalTrainer(config, vocab_size=256)
    model = trainer.create_model(dim=128, num_heads=4, num_layers=3, max_seq_len=128)
    optimizer = trainer.create_optimizer(model, base_lr=1e-3)
    trainer.train_epoch(model, train_windows, optimizer, epoch=0, max_epochs=1)
    trainer.evaluate(model, test_windows)  # ppl, acc, shallow_ratio, compute_cost (TRUE early exit)

The model is the core `LEGOTransformer` with one one-layer `LEGOBlock` per layer, so layer i's logits (its
`norm_out` + the shared head), its exit classifier and the routing all come from `lego`. Training is dense (every
token through every layer); only inference exits early. It runs the shared loop (`lego.training.loop`) like
LEGO's stages: `JointTraining` says what it trains and what its loss is; `UniversalTrainer.train_epoch` takes
one epoch of the loop's very updates (`Updater`) for the Python API. `lego.pipeline.universal` runs it from
Hydra (`method=universal`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lego.errors import DataError
from lego.methods.universal_config import PRESETS, AlphaSchedule, UniversalConfig
from lego.model import LOGIT_CHUNK_ROWS, BlockOutput, LEGOConfig, LEGOTransformer
from lego.moe import MoEFeedForward
from lego.training.loop import LoopConfig, Period, Step, Updater
from lego.training.optim import adamw, param_groups
from lego.training.precision import DEFAULT_PRECISION, autocast
from lego.training.propagation import perplexity, token_losses
from lego.training.routing import evaluate_routed
from lego.training_data import TrainingData

__all__ = [
    "PRESETS", "AlphaSchedule", "JointTraining", "LossParts", "UniversalConfig", "UniversalTrainer",
    "distillation_loss", "run_layers",
]  # fmt: skip


@dataclass
class LossParts:
    """One batch's loss and its terms (all but `total` detached)."""

    total: Tensor
    task: Tensor  # sum_i w_i * L_i
    layer_losses: dict[int, Tensor]  # L_i for every layer that got logits
    exit: Tensor  # BCE of the learned exit classifiers
    distill: Tensor  # KL to the teacher
    self_distill: Tensor  # KL of the exit layers to the final layer
    tokens: int
    layer_tokens: list[int]  # the tokens each layer ran on (fewer than `tokens` under layer dropout)


class UniversalTrainer:
    """Builds the model and its optimizer, trains an epoch, evaluates with routing; no Hydra needed."""

    def __init__(
        self,
        config: UniversalConfig,
        vocab_size: int,
        device: str | torch.device = "cpu",
        precision: str = DEFAULT_PRECISION,  # every forward's (`lego.training.precision`)
    ) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.precision = precision
        self.teacher: LEGOTransformer | None = None

    # -- model and optimizer ---------------------------------------------------------------------
    def create_model(self, dim: int, num_heads: int, num_layers: int, max_seq_len: int = 1024, **kwargs) -> nn.Module:
        """The core LEGOTransformer with `num_layers` one-layer blocks (layer i = `model.blocks[i - 1]`)."""
        config = LEGOConfig(self.vocab_size, dim, num_heads, [1] * num_layers, max_seq_len, **kwargs)
        model = LEGOTransformer.from_config(config).to(self.device)
        self.prepare(model)
        return model

    def prepare(self, model: LEGOTransformer) -> None:
        """Check the config against the model, load the teacher and set the routing."""
        if any(block.num_layers != 1 for block in model.blocks):
            raise ValueError("Universal numbers layers: give the model one-layer blocks (layers_per_block=[1]*N)")
        self.config.check_layers(len(model.blocks))
        teacher = self.config.teacher
        if isinstance(teacher, (str, Path)):  # a model.safetensors of this architecture
            teacher = load_teacher(model, Path(teacher))
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.configure_routing(model)

    def param_groups(self, model: LEGOTransformer, base_lr: float) -> list[dict]:
        """Parameter groups per layer (`lr = base_lr * layer_lr_scales[i]`, default 1) and for the embedding and the
        (tied) head at `base_lr`, the last group. Weight decay as in LEGO's own training (`param_groups`: matrices
        only, not norms or biases), so that the Standard preset and a one-block LEGO run train the same dense model
        the same way."""
        scales = self.config.layer_lr_scales or {}
        groups = []
        for i, block in enumerate(model.blocks, start=1):
            for group in param_groups([block], self.config.weight_decay):
                groups.append({**group, "lr": base_lr * scales.get(i, 1.0), "layer": i})
        for group in param_groups([model.embedding, model.head], self.config.weight_decay):
            groups.append({**group, "lr": base_lr, "layer": 0})
        return [g for g in groups if g["params"]]

    def create_optimizer(self, model: LEGOTransformer, base_lr: float = 1e-3) -> torch.optim.AdamW:
        """AdamW over `param_groups`, with the fused kernel, as the shared loop builds it."""
        defaults = LoopConfig()
        return adamw(self.param_groups(model, base_lr), base_lr, (defaults.beta1, defaults.beta2))

    # -- routing ---------------------------------------------------------------------------------
    def configure_routing(self, model: LEGOTransformer) -> None:
        """Thresholds on the exit layers (0 -> inf, 1.0 -> -inf, see UniversalConfig), inf elsewhere."""
        for i, block in enumerate(model.blocks, start=1):
            exits = i in self.config.exit_layers
            block.threshold = self.config.exit_threshold(i) if exits else math.inf
            block.confidence_method = self.config.confidence_method

    # -- loss ------------------------------------------------------------------------------------
    def layer_weights(self, epoch: int, max_epochs: int, num_layers: int) -> dict[int, float]:
        """This epoch's weights: the alpha schedule's if any, else `layer_weights`; normalised on request."""
        schedule = self.config.alpha_schedule
        weights = schedule.weights(epoch, max_epochs, num_layers) if schedule else dict(self.config.layer_weights)
        if self.config.normalize_weights:
            total = sum(weights.values())
            weights = {i: w / total for i, w in weights.items()}
        return weights

    def logit_layers(self, num_layers: int, weights: dict[int, float]) -> set[int]:
        """Layers that need the shared head in training: weighted ones, plus the exit layers when their
        classifier or self-distillation needs their predictions."""
        layers = {i for i, w in weights.items() if w > 0}
        if self.config.confidence_method == "learned" or self.config.self_distillation > 0:
            layers |= set(self.config.exit_layers)
        if self.config.self_distillation > 0:
            layers.add(num_layers)
        return layers

    def kept_rows(self, batch: int, num_layers: int, step: int, device: torch.device) -> list[Tensor | None]:
        """Per layer, the sequences of a training batch that run it under `layer_dropout` (None: all of them),
        drawn from a generator seeded by the step, so a resumed run drops the same ones."""
        generator = torch.Generator().manual_seed(step)
        rows = []
        for rate in self.config.drop_rates(num_layers):
            keep = torch.rand(batch, generator=generator) >= rate
            rows.append(None if rate == 0 else keep.nonzero().squeeze(1).to(device))
        return rows

    def compute_loss(
        self, model: LEGOTransformer, x: Tensor, y: Tensor, weights: dict[int, float], step: int | None = None
    ) -> LossParts:
        """The joint loss of one batch; with `step` (training) each sequence skips layers as `layer_dropout` says,
        and a layer's loss is over the sequences that ran it."""
        n = len(model.blocks)
        rows = self.kept_rows(x.shape[0], n, step, x.device) if step is not None else [None] * n
        with _dense_heads(model), autocast(self.device, self.precision):
            outs = run_layers(model, x, self.logit_layers(n, weights), rows)
        zero = x.new_zeros((), dtype=torch.float32)
        layer_losses, exit_loss = {}, zero
        layer_tokens = [y.numel() if kept is None else len(kept) * y.shape[1] for kept in rows]
        for i, (out, kept) in enumerate(zip(outs, rows, strict=True), start=1):
            if out is None or not out.logits.numel():
                continue
            ce, right = token_losses(out, y if kept is None else y.index_select(0, kept))
            layer_losses[i] = ce.mean()
            if self.config.confidence_method == "learned" and i in self.config.exit_layers:
                # As LEGO's stages (lego.fitting): "is this layer's argmax right?", on the classifier's detached input.
                exit_logit = out.exit_logit.reshape(-1).index_select(0, out.logits_index)
                exit_loss = exit_loss + F.binary_cross_entropy_with_logits(exit_logit.float(), right.float())
        # a layer every sequence skipped (layer dropout) has no loss at this step
        task = sum((w * layer_losses[i] for i, w in weights.items() if w > 0 and i in layer_losses), zero)
        # MoE layers' load-balancing and router z-losses (lego.moe), whatever the preset weights
        moe = sum((loss for block in model.blocks if (loss := block.moe_aux_loss()) is not None), zero)
        total = task + self.config.exit_loss_weight * exit_loss

        distill = self_distill = zero
        temperature = self.config.distillation_temperature
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.device, self.precision):
                teacher_logits = run_layers(self.teacher, x, {n})[-1].logits
            distill = sum(
                (
                    w * distillation_loss(outs[i - 1].logits, teacher_logits, temperature)
                    for i, w in weights.items()
                    if w > 0
                ),
                zero,
            )
            alpha = self.config.distillation_alpha
            total = alpha * task + (1 - alpha) * distill + self.config.exit_loss_weight * exit_loss
        if self.config.self_distillation > 0:
            final = outs[-1].logits.detach()
            self_distill = sum(
                (distillation_loss(outs[i - 1].logits, final, temperature) for i in self.config.exit_layers), zero
            )
            total = total + self.config.self_distillation * self_distill
        total = total + moe
        detached = {i: loss.detach() for i, loss in layer_losses.items()}
        return LossParts(
            total, task.detach(), detached, exit_loss.detach(), distill.detach(), self_distill.detach(), y.numel(),
            layer_tokens,
        )  # fmt: skip

    # -- training and evaluation -----------------------------------------------------------------
    def train_epoch(
        self,
        model: LEGOTransformer,
        data: TrainingData | Tensor,
        optimizer: torch.optim.Optimizer,
        epoch: int = 0,
        max_epochs: int = 1,
        *,
        batch_size: int = 16,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        grad_clip: float = 1.0,
        seed: int = 0,
        max_steps: int | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> dict:
        """One shuffled pass over `data` (a TrainingData or (n, seq + 1) token windows), each step the shared
        loop's update (`Updater`: the exit classifiers clipped on their own). `callback` gets a "step" event per
        step; `max_steps` stops the epoch early. Returns the token-weighted mean losses."""
        method = JointTraining(self, model, as_training_data(data), None, max_epochs)
        update = Updater(optimizer, scheduler, method.blocks, grad_clip)
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        model.train()
        sums: dict[str, float] = {}
        tokens = steps = 0
        for batch in method.train.batches(batch_size, shuffle=True, generator=generator):
            if max_steps is not None and steps >= max_steps:
                break
            step = method.step(batch, epoch)
            grad_norm = update(step.loss)
            steps += 1
            tokens += step.tokens
            terms = {"loss": step.loss.item(), "lm_loss": float(step.lm_loss), "exit_loss": float(step.exit_loss)}
            terms |= step.terms
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value * step.tokens
            if callback:
                callback({
                    "kind": "step", "epoch": epoch, "tokens": step.tokens, "grad_norm": float(grad_norm),
                    "lr": optimizer.param_groups[-1]["lr"], **terms,
                })  # fmt: skip
        means = {key: value / max(tokens, 1) for key, value in sums.items()}
        return {**means, "ppl": perplexity(means.get("lm_loss", 0.0)), "tokens": tokens, "steps": steps}

    @torch.no_grad()
    def layer_metrics(self, model: LEGOTransformer, data: TrainingData | Tensor, batch_size: int = 64) -> dict:
        """Every layer's own loss, PPL and accuracy on every token (no routing): {layer: {...}}."""
        data = as_training_data(data)
        was_training = model.training
        model.eval()
        n = len(model.blocks)
        ce_sum, correct, count = [0.0] * n, [0] * n, 0
        with _dense_heads(model), autocast(self.device, self.precision):
            for batch in data.batches(batch_size):
                y = batch.targets.to(self.device)
                for k, out in enumerate(run_layers(model, batch.input_ids.to(self.device), set(range(1, n + 1)))):
                    ce, right = token_losses(out, y)
                    ce_sum[k] += float(ce.sum())
                    correct[k] += int(right.sum())
                count += y.numel()
        model.train(was_training)
        metrics = {}
        for k in range(n):
            loss = ce_sum[k] / max(count, 1)
            metrics[k + 1] = {"loss": loss, "ppl": perplexity(loss), "acc": correct[k] / max(count, 1)}
        return metrics

    def evaluate(self, model: LEGOTransformer, data: TrainingData | Tensor, batch_size: int = 64) -> dict:
        """Routed (TRUE early exit) PPL, accuracy, shallow ratio and compute cost with this config's routing."""
        self.configure_routing(model)
        data = as_training_data(data)
        windows = torch.cat([data.input_ids, data.targets[:, -1:]], dim=1).long()  # ids may be stored narrow
        result = evaluate_routed(model, windows, batch_size, self.device, self.precision)
        keys = ("ppl", "acc", "loss", "shallow_ratio", "compute_cost", "honest_cost", "exit_rates", "tokens")
        return {key: result[key] for key in keys}


class JointTraining:
    """Universal as a loop `Method`: the whole model trained on `train`'s token windows, every layer at once on
    `UniversalTrainer.compute_loss` with this epoch's layer weights; validated per layer on `val`."""

    def __init__(
        self,
        trainer: UniversalTrainer,
        model: LEGOTransformer,
        train: TrainingData,
        val: TrainingData | None,
        max_epochs: int,
        eval_batch_size: int = 64,
        *,
        seed: int = 0,
        total_steps: int | None = None,
    ) -> None:
        self.trainer, self.model, self.train, self.val = trainer, model, train, val
        self.max_epochs, self.eval_batch_size = max_epochs, eval_batch_size
        self.seed, self.total_steps = seed, total_steps  # layer dropout's draws; the gradual curriculum's length
        self.steps = 0  # steps taken (the layer-dropout draws and the curriculum follow it)
        self.modules: list[nn.Module] = [model]
        self.blocks = list(model.blocks)

    def param_groups(self, config: LoopConfig) -> list[dict]:
        return self.trainer.param_groups(self.model, config.lr)

    def resume_at(self, step: int) -> None:
        """A resumed run continues its curriculum and layer-dropout draws at the step it stopped at."""
        self.steps = step

    def named_moe_ffns(self) -> dict[str, MoEFeedForward]:
        return self.model.named_moe_ffns()

    def step(self, batch: TrainingData, epoch: int) -> Step:
        """The weighted loss of one batch, with every layer's own loss and training FLOPs (head work only on the
        layers that get logits)."""
        n_layers, device, config = len(self.blocks), self.trainer.device, self.trainer.config
        weights = self.trainer.layer_weights(epoch, self.max_epochs, n_layers)
        progress = self.steps / self.total_steps if self.total_steps else 0.0
        weights = config.curriculum(weights, self.steps, progress, n_layers)
        dropping = config.layer_dropout > 0
        x, y = batch.input_ids.to(device), batch.targets.to(device)
        parts = self.trainer.compute_loss(
            self.model, x, y, weights, step=self.seed * 1_000_003 + self.steps if dropping else None
        )
        self.steps += 1
        logit_layers = self.trainer.logit_layers(n_layers, weights)
        flops = [
            3 * block.forward_flops(n, n, self.train.seq_len, n if k in logit_layers else 0)
            for k, (block, n) in enumerate(zip(self.blocks, parts.layer_tokens, strict=True), start=1)
        ]
        terms = {f"layer{i}_loss": loss for i, loss in parts.layer_losses.items()}  # on the device: no host sync
        return Step(parts.total, parts.task, parts.exit, parts.tokens, flops, terms)

    def validate(self, period: Period) -> dict:
        """The final layer's row (early stopping and the divergence check read it), each layer's PPL, and one
        row per layer (`layers`): its own train loss since the last validation and its val loss/PPL/acc."""
        metrics = self.trainer.layer_metrics(self.model, self.val, self.eval_batch_size)
        rows = []
        for i, layer in metrics.items():
            train_loss = period.mean(f"layer{i}_loss")
            rows.append({
                "step": period.step, "epoch": period.epoch, "train_loss": train_loss,
                "train_ppl": perplexity(train_loss), "val_loss": layer["loss"], "val_ppl": layer["ppl"],
                "val_acc": layer["acc"],
            })  # fmt: skip
        final = {key: value for key, value in rows[-1].items() if key not in ("step", "epoch")}
        return {**final, **{f"val_ppl_layer{i}": row["val_ppl"] for i, row in enumerate(rows, start=1)}, "layers": rows}


def run_layers(
    model: LEGOTransformer, x: Tensor, logit_layers: set[int], kept_rows: list[Tensor | None] | None = None
) -> list[BlockOutput | None]:
    """Every token through every layer (dense); head work only for the layers in `logit_layers` (1-based). With
    `kept_rows`, layer i runs only on the sequences `kept_rows[i - 1]` lists (None: all); the others pass it
    unchanged, its output covers the kept ones (None when it kept none)."""
    h = model.embedding(x)
    outs: list[BlockOutput | None] = []
    for i, block in enumerate(model.blocks, start=1):
        logits_for = "active" if i in logit_layers else "none"
        rows = kept_rows[i - 1] if kept_rows is not None else None
        if rows is None:
            out = block.run(h, None, logits_for=logits_for)
            h = out.hidden
        elif len(rows):
            out = block.run(h.index_select(0, rows), None, logits_for=logits_for)
            h = h.index_copy(0, rows, out.hidden)
        else:
            out = None  # every sequence skipped this layer
        outs.append(out)
    return outs


def load_teacher(model: LEGOTransformer, path: Path) -> LEGOTransformer:
    """A copy of `model` with the weights of `path` (a model.safetensors of the same architecture); a missing,
    damaged or mismatching file is one DataError naming it."""
    if not path.is_file():
        raise DataError(f"universal.teacher={path} does not exist; give a trained model.safetensors of this model")
    teacher = copy.deepcopy(model)
    try:
        load_model(teacher, str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types; load_state_dict a RuntimeError
        reason = " ".join(str(err).split())[:200]
        raise DataError(
            f"universal.teacher={path} cannot be loaded into this model ({reason}); give a model.safetensors "
            "trained with the same model config"
        ) from None
    return teacher


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean per-token KL(p_teacher || p_student) at `temperature`, scaled by T^2 (Hinton et al.) so its
    gradient keeps its size as T changes. Zero when the two agree. Over (rows, vocab) logits `LOGIT_CHUNK_ROWS`
    rows at a time, as the cross-entropy (`lego.model.cross_entropy_rows`): never all rows' float32 log-probs."""
    keep_graph = torch.is_grad_enabled() and student_logits.requires_grad
    parts = [
        checkpoint(_kl_sum, s, t, temperature, use_reentrant=False) if keep_graph else _kl_sum(s, t, temperature)
        for s, t in zip(student_logits.split(LOGIT_CHUNK_ROWS), teacher_logits.split(LOGIT_CHUNK_ROWS), strict=True)
    ]
    return torch.stack(parts).sum() / student_logits.shape[0] * temperature * temperature


def _kl_sum(student_logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum")


def as_training_data(data: TrainingData | Tensor) -> TrainingData:
    """TrainingData of token ids, or (n, seq + 1) token windows (a tensor or TokenWindows) turned into it."""
    data = data if isinstance(data, TrainingData) else TrainingData.from_windows(data)  # a tensor or TokenWindows
    if data.input_ids is None:
        raise ValueError("Universal trains from token ids: give token windows or TrainingData.from_windows(...)")
    return data


@contextmanager
def _dense_heads(model: LEGOTransformer) -> Iterator[None]:
    """In training, confidence is not needed; the `learned` method is the one that costs no head work on
    layers whose logits are not asked for (max_softmax / entropy would run the head on every layer)."""
    saved = [block.confidence_method for block in model.blocks]
    for block in model.blocks:
        block.confidence_method = "learned"
    try:
        yield
    finally:
        for block, method in zip(model.blocks, saved, strict=True):
            block.confidence_method = method
