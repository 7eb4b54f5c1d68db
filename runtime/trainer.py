"""PEQA fine-tuning: train one tenant's scale set on the frozen quantized base, beside serving.

PEQA (Kim et al. 2023, "Memory-Efficient Fine-Tuning of Compressed LLMs via sub-4-bit Integer Quantization")
fine-tunes only the quantization scales S of ``W = S ⊙ (Q − Z)``; the integers Q and zero points Z stay frozen.

Parametrisation (positivity): we train a log-space delta per scale, ``S = S_init · exp(δ)`` with δ initialised
to 0 (fp32 master copy). Scales stay positive by construction (no clamping), the learning rate means the same
relative step in every layer whatever its scale magnitude (scales span orders of magnitude across layers), and
AdamW's decoupled weight decay pulls δ toward 0, i.e. toward the starting scales rather than toward zero.

Isolation from serving: the shared model is never written. The trainer hands its scales to every
``QuantLinear`` through ``ForwardContext.scale_override[name]`` = a (1, N, G) tensor (with ``slot_ids=None``,
every row uses it), in a ContextVar that the serving thread never sees. ``model.gradient_checkpointing`` is a
flag the model only honours when grad is enabled, which serving never does. Gradients come from
``torch.autograd.grad`` w.r.t. δ only, so no ``.grad`` of the shared model is ever written.

Loop: AdamW, linear warmup then cosine (or linear / constant) decay, global-norm clipping, gradient accumulation
(loss = mean over the target tokens of the whole accumulated batch), gradient checkpointing over decoder layers,
the LM head applied only to target positions (saves the (B, T, V) logits). Safety: a non-finite loss or gradient,
or a loss above ``divergence_factor`` × the first step's loss, aborts with status "failed" and no scales.
Cancellation: a ``threading.Event`` checked between micro-batches.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .finetune_data import IGNORE_INDEX, Example, count_target_tokens, fixed_batches, iterate_batches
from .forward_context import ForwardContext, forward_context
from .quant_linear import QuantLinear

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainingConfig:
    """Hyperparameters of one PEQA run. ``max_steps`` (optimizer steps) wins over ``n_epochs`` when set."""

    learning_rate: float = 2e-2  # on δ = log(S / S_init): 2e-2 ≈ at most ~2 % relative change per step
    n_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4  # examples per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    warmup_steps: int | None = None  # None: 10 % of the steps (at least 1 when there are >= 10 steps)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # the decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0  # decoupled, toward the starting scales
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    max_seq_len: int = 512
    gradient_checkpointing: bool = True
    seed: int = 0
    eval_every: int = 0  # validation every N steps (0: only before and after training)
    eval_batch_size: int = 4
    divergence_factor: float = 4.0  # abort when a step's loss exceeds this × the first step's loss
    num_threads: int | None = None  # torch intra-op threads for the training thread (None: leave as is)
    cpu_share: float = 1.0  # fraction of wall time the loop may run; sleeps between steps for the rest

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive finite number, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("n_epochs", "batch_size", "grad_accum_steps", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
        if not 0.0 < self.cpu_share <= 1.0:
            raise ValueError(f"cpu_share must be in (0, 1], got {self.cpu_share}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")

    def total_steps(self, num_train_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = math.ceil(num_train_examples / (self.batch_size * self.grad_accum_steps))
        return max(1, per_epoch * self.n_epochs)

    def num_warmup_steps(self, total: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total)
        return total // 10

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate for optimizer step ``step`` (1-based) of ``total``."""
        warm = self.num_warmup_steps(total)
        if warm and step <= warm:
            return self.learning_rate * step / warm
        if self.schedule == "constant" or total <= warm:
            return self.learning_rate
        progress = (step - warm) / max(1, total - warm)  # (0, 1]
        lo = self.learning_rate * self.min_lr_ratio
        if self.schedule == "linear":
            return lo + (self.learning_rate - lo) * (1.0 - progress)
        return lo + (self.learning_rate - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepMetrics:
    step: int  # 1-based optimizer step
    total_steps: int
    loss: float  # mean token cross-entropy of this step's batch
    learning_rate: float
    grad_norm: float  # before clipping
    trained_tokens: int  # cumulative target tokens so far
    seconds: float  # wall time of this step (excluding the cpu_share pause)
    validation_loss: float | None = None


@dataclass
class TrainResult:
    status: str  # "succeeded" | "failed" | "cancelled"
    scales: dict[str, torch.Tensor] | None  # name -> float32 (N, G), only when succeeded
    steps: int
    trained_tokens: int
    train_losses: list[float] = field(default_factory=list)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss); step 0 = before
    error_code: str | None = None  # "diverged" | "non_finite_loss" | "cancelled"
    error_message: str | None = None
    seconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class TrainingAborted(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """All :class:`QuantLinear` modules of ``model`` by their ``name`` (the scale-set tensor name)."""
    found = {m.name: m for m in model.modules() if isinstance(m, QuantLinear)}
    if not found:
        raise ValueError("the model has no QuantLinear layers; PEQA fine-tuning needs a quantized base")
    return found


class ScaleTrainer:
    """Trains δ (log-scale deltas) for one tenant on a shared, frozen quantized model.

    ``init_scales``: name -> float32 (N, G) the run starts from (the tenant's current scales, or the base's);
    missing names start from the layer's slot-0 bank (the base scales).
    """

    def __init__(self, model: nn.Module, config: TrainingConfig, init_scales: dict[str, torch.Tensor] | None = None,
                 pad_id: int = 0):
        self.model = model
        self.config = config
        self.pad_id = pad_id
        self.layers = quant_linears(model)
        init_scales = init_scales or {}
        unknown = sorted(set(init_scales) - set(self.layers))
        if unknown:
            raise ValueError(f"init_scales has {len(unknown)} name(s) the model lacks, e.g. {unknown[0]!r}")
        self.names = sorted(self.layers)
        self.log_init: dict[str, torch.Tensor] = {}
        for name in self.names:
            layer = self.layers[name]
            s = init_scales.get(name, layer.bank[0]).detach().to(layer.bank.device, torch.float32).clone()  # (N, G)
            assert s.shape == layer.bank.shape[1:], (name, s.shape, layer.bank.shape)
            if not (torch.isfinite(s).all() and (s > 0).all()):
                raise ValueError(f"initial scales of {name!r} must be finite and positive")
            self.log_init[name] = s.log()
        self.deltas = [torch.zeros_like(self.log_init[n], requires_grad=True) for n in self.names]  # fp32 master

    @property
    def num_trainable_params(self) -> int:
        return sum(d.numel() for d in self.deltas)

    def current_scales(self) -> dict[str, torch.Tensor]:
        """name -> float32 (N, G) = S_init · exp(δ), detached, on the CPU."""
        with torch.no_grad():
            return {n: (self.log_init[n] + d).exp().cpu() for n, d in zip(self.names, self.deltas)}

    def _override(self) -> dict[str, torch.Tensor]:
        return {n: (self.log_init[n] + d).exp().unsqueeze(0) for n, d in zip(self.names, self.deltas)}  # (1, N, G)

    def _batch_loss_sum(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over target positions of one micro-batch (B, T), and their count."""
        device = self.model.model.embed_tokens.weight.device
        input_ids, labels = input_ids.to(device), labels.to(device)
        h = self.model.hidden_states(input_ids)  # (B, T, C)
        sel = labels != IGNORE_INDEX  # (B, T)
        logits = self.model.lm_head(h[sel]).float()  # (n, V), only the positions that carry a loss
        return F.cross_entropy(logits, labels[sel], reduction="sum"), int(sel.sum())

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example]) -> float:
        """Mean token cross-entropy of ``examples`` under the current scales (nats)."""
        total, count = 0.0, 0
        with forward_context(ForwardContext(scale_override=self._override())):
            for ids, labels in fixed_batches(examples, self.config.eval_batch_size, self.pad_id):
                loss, n = self._batch_loss_sum(ids, labels)
                total += float(loss)
                count += n
        assert count > 0, "evaluation set has no target tokens"
        return total / count

    def train(
        self,
        train_examples: Sequence[Example],
        validation_examples: Sequence[Example] = (),
        cancel: threading.Event | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
        progress: bool = False,
    ) -> TrainResult:
        """Run the whole schedule. Never raises for divergence/cancel: returns a result with that status."""
        cfg = self.config
        if not train_examples or count_target_tokens(train_examples) == 0:
            raise ValueError("no training examples with target tokens")
        prev_threads = torch.get_num_threads()
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)  # NOTE: per-thread under OpenMP builds; restored below
        prev_ckpt = getattr(self.model, "gradient_checkpointing", False)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        for p in self.model.parameters():  # frozen base (serving never needs grads: no-op for it)
            p.requires_grad_(False)
        t_start = time.perf_counter()
        total = cfg.total_steps(len(train_examples))
        result = TrainResult(status="running", scales=None, steps=0, trained_tokens=0)
        torch.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(self.deltas, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay)
        batches = iterate_batches(train_examples, cfg.batch_size, cfg.seed, self.pad_id)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="peqa", unit="step", dynamic_ncols=True)
        try:
            if validation_examples:
                result.validation_losses.append((0, self.evaluate(validation_examples)))
            first_loss: float | None = None
            for step in range(1, total + 1):
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.grad_accum_steps)]
                n_tok = sum(int((lab != IGNORE_INDEX).sum()) for _, lab in micro)
                grads = [torch.zeros_like(d) for d in self.deltas]
                loss_value = 0.0
                for ids, labels in micro:
                    if cancel is not None and cancel.is_set():
                        raise TrainingAborted("cancelled", "cancelled by request")
                    if int((labels != IGNORE_INDEX).sum()) == 0:
                        continue
                    with forward_context(ForwardContext(scale_override=self._override())):
                        loss_sum, _ = self._batch_loss_sum(ids, labels)
                        loss = loss_sum / n_tok
                        micro_grads = torch.autograd.grad(loss, self.deltas)
                    loss_value += float(loss.detach())
                    for g, mg in zip(grads, micro_grads):
                        g.add_(mg)
                if not math.isfinite(loss_value):
                    raise TrainingAborted("non_finite_loss", f"loss became {loss_value} at step {step}")
                if first_loss is None:
                    first_loss = loss_value
                elif loss_value > cfg.divergence_factor * first_loss:
                    raise TrainingAborted(
                        "diverged",
                        f"loss {loss_value:.4g} at step {step} exceeds {cfg.divergence_factor:g}x the first "
                        f"step's {first_loss:.4g}; lower the learning rate",
                    )
                grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
                if not math.isfinite(grad_norm):
                    raise TrainingAborted("non_finite_loss", f"gradient norm became {grad_norm} at step {step}")
                if cfg.max_grad_norm is not None and grad_norm > cfg.max_grad_norm:
                    for g in grads:
                        g.mul_(cfg.max_grad_norm / (grad_norm + 1e-6))
                for d, g in zip(self.deltas, grads):
                    d.grad = g
                lr = cfg.lr_at(step, total)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                result.steps = step
                result.trained_tokens += n_tok
                result.train_losses.append(loss_value)
                val = None
                if validation_examples and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                    val = self.evaluate(validation_examples)
                    result.validation_losses.append((step, val))
                seconds = time.perf_counter() - t0
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
                    bar.update(1)
                if on_step is not None:
                    on_step(StepMetrics(step, total, loss_value, lr, grad_norm, result.trained_tokens, seconds, val))
                if cfg.cpu_share < 1.0:  # leave the rest of the CPU to serving
                    time.sleep(seconds * (1.0 - cfg.cpu_share) / cfg.cpu_share)
            scales = self.current_scales()
            for name, s in scales.items():
                if not (torch.isfinite(s).all() and (s > 0).all()):
                    raise TrainingAborted("non_finite_loss", f"trained scales of {name!r} are not finite and positive")
            if validation_examples:
                val = self.evaluate(validation_examples)
                if not math.isfinite(val):
                    raise TrainingAborted("non_finite_loss", f"validation loss became {val}")
                result.validation_losses.append((result.steps, val))
            result.status, result.scales = "succeeded", scales
        except TrainingAborted as e:
            result.status = "cancelled" if e.code == "cancelled" else "failed"
            result.error_code, result.error_message = e.code, e.message
            result.scales = None
        finally:
            if bar is not None:
                bar.close()
            self.model.gradient_checkpointing = prev_ckpt
            if cfg.num_threads is not None:
                torch.set_num_threads(prev_threads)
            result.seconds = time.perf_counter() - t_start
        return result


def evaluate_scales(model: nn.Module, examples: Iterable[Example], scales: dict[str, torch.Tensor] | None = None,
                    batch_size: int = 4, pad_id: int = 0) -> float:
    """Mean token cross-entropy (nats) of ``examples`` with the given scale set (None: the base's slot 0)."""
    trainer = ScaleTrainer(model, TrainingConfig(eval_batch_size=batch_size), init_scales=scales, pad_id=pad_id)
    return trainer.evaluate(list(examples))
