"""Regular training (sources, held-outs) and evaluation.

A seed fixes everything (initialisation, shuffling, augmentation): two CPU runs with the same seed give
bitwise-identical weights. Training state is saved after every epoch, so a killed run resumes where it
stopped and ends with the same weights; a NaN/inf loss stops with the last good state kept. All of this
is `fit`, the one training loop; regular training (`train`) and Starlight are two uses of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import load_state, save_state
from .config import RUN_GUARDS, Config, OptimizerConfig, ScheduleConfig, StopConfig, TrainConfig
from .data import DataBundle, Split, batches, data_meta, first_inputs, get_dataset, num_batches, per_token
from .engine import evaluate_module
from .errors import UserError
from .models import build_model
from .permute.inputs import forward_once
from .utils import resolve_device  # noqa: F401  (moved to utils; importable from here too)
from .runtime import record, warn_if_changed


def build_optimizer(params: Iterable[torch.Tensor], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate at a given optimiser step (schedules step per batch)."""
    total = max(1, steps_per_epoch * epochs)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.name == "onecycle":
        up = max(1, int(cfg.pct_start * total))
        if step < up:
            return 0.04 + 0.96 * step / up
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - up) / max(1, total - up))))
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
    if cfg.name == "step":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= e for e in cfg.step_epochs)
    return 1.0


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(cfg.schedule, s, steps_per_epoch, cfg.epochs))


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000, device: str | torch.device | None = None,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy (a fraction) over a whole split, in eval mode (the engine's
    evaluation of one model, `engine.evaluate_module`)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = evaluate_module(forward or model, split, batch_size, device)
    model.train(was_training)
    return out


def evaluate_splits(model: nn.Module, data: DataBundle, batch_size: int = 1000) -> dict[str, dict[str, float]]:
    """The contract of `stardomain eval --json`: {"train": {...}, "test": {...}} on un-augmented data."""
    return {s: evaluate(model, data.split(s), batch_size) for s in ("train", "test")}


def config_digest(cfg: Config) -> str:
    """Identifies a run's resume state: the config without its RUN_GUARDS (config.result_identity)."""
    guards = {g: True for g in RUN_GUARDS}
    text = cfg.model_dump_json(exclude={"train": guards, "star": {"train": guards}})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_meta(cfg: Config, data: DataBundle, seed: int, role: str, *, device: str | torch.device | None = None,
               history: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
    """The metadata every model file carries (docs/architecture.md, "Contracts"): enough to rebuild it and know how it was made,
    including where it ran (`runtime`: threads, device, version; bits depend on them) and, when given,
    the per-epoch training `history`."""
    runtime = record(resolve_device(device if device is not None else cfg.study.device))
    return {
        "model": cfg.model.model_dump(),
        "data": data_meta(data, cfg.data),
        "seed": seed,
        "role": role,
        "config": cfg.model_dump(),
        "runtime": runtime,
        **({"history": history} if history is not None else {}),
        **extra,
    }


PLAIN_EVERY_S = 5.0  # piped progress: at most one line this often


class Progress:
    """Training progress that suits where stderr goes: a tqdm bar on a terminal; a plain line at most
    every PLAIN_EVERY_S seconds otherwise (a log file or pipe gets no carriage-return noise, yet still
    shows epoch, loss, accuracy and ETA); nothing when `enabled` is False."""

    def __init__(self, desc: str, epochs: int, steps: int, start_epoch: int, enabled: bool | None):
        self.desc, self.epochs, self.steps = desc, epochs, steps
        self.mode = "off" if enabled is False else ("bar" if sys.stderr.isatty() else "plain")
        self.done0 = self.done = start_epoch * steps
        self.t0 = self.last = time.monotonic()
        self.bar = tqdm(total=epochs * steps, initial=self.done, desc=desc, unit="batch", leave=False,
                        dynamic_ncols=True) if self.mode == "bar" else None

    def update(self, epoch: int, loss: float, acc: float | None, end_of_epoch: bool = False) -> None:
        self.done += 0 if end_of_epoch else 1
        if self.bar is not None and not end_of_epoch:
            self.bar.update()
            self.bar.set_postfix(epoch=f"{epoch + 1}/{self.epochs}", loss=f"{loss:.4f}",
                                 **({"acc": f"{acc:.3f}"} if acc is not None else {}))
        now = time.monotonic()
        last_epoch = end_of_epoch and epoch + 1 == self.epochs
        if self.mode != "plain" or (now - self.last < PLAIN_EVERY_S and not last_epoch):
            return
        self.last = now
        rate = (now - self.t0) / max(1, self.done - self.done0)
        eta = rate * (self.epochs * self.steps - self.done)
        print(f"{self.desc}: epoch {epoch + 1}/{self.epochs}  loss {loss:.4f}"
              + (f"  acc {acc:.4f}" if acc is not None else "") + f"  ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def init_model(cfg: Config, data: DataBundle, seed: int) -> nn.Module:
    """The seeded initialisation: the same seed always gives the same initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes, tokens=data.sequence)
    if cfg.model.factory:
        check_output(model, data)
    return model


def check_output(model: nn.Module, data: DataBundle) -> None:
    """A model brought by the user must give what every loss and metric here reads: one tensor of logits,
    (N, classes) for class labels or (N, T, vocabulary) for next-token targets, covering num_classes.
    Checked once on two training inputs (no gradients, eval mode; the RNG and the module's mode restored),
    so a mismatch is one clear line, not an error deep in training; a forward that fails here is left to
    fail where it runs."""
    x = first_inputs(data.train)
    try:
        out = forward_once(model, x)
    except Exception:  # noqa: BLE001 (not this check's to report)
        return
    want = (f"(N, T, vocabulary {data.num_classes})" if data.sequence else f"(N, {data.num_classes} classes)")
    if not torch.is_tensor(out):
        raise UserError(f"the model returns a {type(out).__name__}; training and evaluation need one tensor of "
                        f"logits {want}: return the logits alone")
    lead = tuple(x.shape[:2]) if data.sequence else (len(x),)
    if tuple(out.shape[:-1]) != lead or out.shape[-1] < data.num_classes:
        raise UserError(f"the model returns logits of shape {tuple(out.shape)} for inputs of shape {tuple(x.shape)}; "
                        f"the data need {want} (labels 0..{data.num_classes - 1})")


def save_training_state(path, digest: str, seed: int, epoch: int, model: nn.Module, opt, sched,
                        gen: torch.Generator, device: torch.device, **extra: Any) -> None:
    """Everything a resumed run needs to continue bit for bit, saved atomically (no pickle)."""
    save_state(path, {"digest": digest, "seed": seed, "epoch": epoch, "model": model.state_dict(),
                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                      "torch_rng": torch.get_rng_state(),
                      "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, **extra})


def resume_training_state(path, digest: str, seed: int, model: nn.Module, opt, sched, gen: torch.Generator,
                          device: torch.device) -> dict | None:
    """Restore a saved state into the run's objects if it belongs to this run (same config digest and
    seed). -> the state (for fields of the caller's own), or None when there is nothing to resume."""
    if not path or not Path(path).exists():
        return None
    st = load_state(path)
    if st.get("digest") != digest or st.get("seed") != seed:
        return None
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    gen.set_state(st["generator"])
    torch.set_rng_state(st["torch_rng"])
    if device.type == "cuda" and st.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(st["cuda_rng"], device)
    return st


@dataclass(frozen=True)
class StopRule:
    """When `fit` stops before its cap (train.epochs): at the first epoch end where the model's training loss
    is at or below `loss` or its training accuracy at or above `acc`, both measured on the whole training
    split without augmentation, in eval mode (the same numbers as the model's final train metrics).
    `criterion` says it in words for the metadata."""

    loss: float | None = None
    acc: float | None = None
    criterion: str = ""

    @classmethod
    def of(cls, stop: StopConfig | None) -> "StopRule | None":
        if stop is None:
            return None
        words = [f"training loss <= {stop.loss:g}" if stop.loss is not None else "",
                 f"training accuracy >= {stop.acc:g}" if stop.acc is not None else ""]
        return cls(stop.loss, stop.acc, " or ".join(w for w in words if w))

    def met(self, check: dict | None) -> bool:
        if not check:
            return False
        return bool((self.loss is not None and check["loss"] <= self.loss)
                    or (self.acc is not None and check["acc"] >= self.acc))

    def met_by(self, history: list[dict]) -> bool:
        """The last finished epoch met the rule (so a resumed run that was stopping stops)."""
        return bool(history) and self.met(history[-1].get("check"))


def fit_record(rule: StopRule | None, cap: int, history: list[dict]) -> dict[str, Any]:
    """What every model's metadata says about how long it trained (`fit`): the criterion, the cap, the
    epochs run and whether the rule was met (None without a rule: a fixed number of epochs)."""
    if rule is None:
        return {"criterion": f"a fixed {cap} epochs", "cap": cap, "epochs": len(history), "reached": None}
    last = history[-1].get("check") if history else None
    return {"criterion": rule.criterion, "cap": cap, "epochs": len(history), "reached": rule.met(last),
            "target_loss": rule.loss, "target_acc": rule.acc,
            **({"train_loss": last["loss"], "train_acc": last["acc"]} if last else {})}


@dataclass
class Hooks:
    """What one use of `fit` adds to the plain loop. `step(x, y, n)` runs optimiser step n's forward and
    backward (zeroed gradients in, gradients out; autocast is its own business) -> (loss, correct
    predictions or None). `ready()` runs once after a resume, before the first epoch; `epoch_start(e)` and
    `epoch_end(e, mean loss)` around an epoch's steps (before its state is saved); `saved(e)` after.
    `epoch_start` also gets the number of optimiser steps taken so far.
    `state()` -> extra resumable state (plain data, saved every epoch); `restore(st)` reads it back.
    `diverged(loss, epoch)` -> the one-line error for a non-finite loss. `logged(e, record)` gets each
    epoch's {epoch, loss, acc} once the epoch is saved (TensorBoard, stardomain.tblog). `stop`: the rule
    that may end training before tc.epochs (checked after `epoch_end`, on the weights that are saved)."""

    step: Callable[[torch.Tensor, torch.Tensor, int], tuple[float, int | None]]
    diverged: Callable[[float, int], str]
    desc: str = "train"
    ready: Callable[[], None] = lambda: None
    epoch_start: Callable[[int, int], None] = lambda epoch, n_step: None
    epoch_end: Callable[[int, float], None] = lambda epoch, loss: None
    saved: Callable[[int], None] = lambda epoch: None
    state: Callable[[], dict] = dict
    restore: Callable[[dict], None] = lambda st: None
    logged: Callable[[int, dict], None] = lambda epoch, record: None
    stop: StopRule | None = None

    def done(self, history: list[dict]) -> bool:
        """The last finished epoch met the stop rule (perhaps before a kill): train no further."""
        return self.stop is not None and self.stop.met_by(history)

    def check(self, model: nn.Module, split: Split, batch_size: int) -> dict:
        """With a stop rule, {"check": the training split's loss and accuracy}, for the epoch's record."""
        return {} if self.stop is None else {"check": evaluate(model, split, batch_size)}


def divergence(loss: float, first: float, factor: float | None) -> str | None:
    """None while training is sane; else what the diverged line adds: '' for a NaN/inf loss, the bound for a
    loss above `factor` times the run's first mini-batch loss (at least 1, so a run that starts near zero,
    a star initialised from a source, is not stopped by an ordinary rise)."""
    if not math.isfinite(loss):
        return ""
    if factor is not None and math.isfinite(first) and loss > factor * max(first, 1.0):
        return (f" (the loss grew past {factor:g} times the first mini-batch's {first:.4g}; the bound is "
                "train.divergence_factor)")
    return None


def _first_unless_diverged(loss: float, first: float | None, tc: TrainConfig, hooks: Hooks, epoch: int,
                           bar: Progress) -> float:
    """The run's first loss (the divergence reference); a loss past tc.divergence_factor times it stops
    the run with hooks.diverged's line, like NaN."""
    first = loss if first is None else first
    grown = divergence(loss, first, tc.divergence_factor)
    if grown is not None:
        bar.close()
        raise UserError(hooks.diverged(loss, epoch) + grown)
    return first


def fit(model: nn.Module, data: DataBundle, tc: TrainConfig, seed: int, digest: str, hooks: Hooks, *,
        device: torch.device, state_path: str | Path | None = None, progress: bool | None = None,
        history: list[dict] | None = None) -> int:
    """The one training loop (regular training and Starlight are two uses): optimiser, per-batch schedule,
    seeded data order, resume state saved after every epoch (bitwise-identical continuation), progress
    bar, non-finite-loss stop (the last good state kept), gradient clipping. `model` is on `device`.
    `history` (a list) receives {epoch, loss, acc} per epoch (and, with a stop rule, `check`: the training
    split's loss and accuracy at the epoch's end), kept across a resume. With `hooks.stop`, training ends
    at the first epoch end that meets it, else at tc.epochs (`fit_record` says which).
    -> the number of optimiser steps taken in all."""
    history = [] if history is None else history
    opt = build_optimizer(model.parameters(), tc.optimizer)
    drop_last = len(data.train) > tc.batch_size
    steps = num_batches(data.train, tc.batch_size, drop_last=drop_last)
    sched = build_scheduler(opt, tc, steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout and other global draws; restored below when resuming
    start_epoch, n_step, first = 0, 0, None
    st = resume_training_state(state_path, digest, seed, model, opt, sched, gen, device)
    if st is not None:
        start_epoch, first = st["epoch"], st.get("first_loss")
        n_step = st.get("step", start_epoch * steps)
        history[:] = list(st.get("fit_history") or [])
        warn_if_changed(st.get("runtime"), record(device), what=hooks.desc)
        hooks.restore(st)
    hooks.ready()
    bar = Progress(hooks.desc, tc.epochs, steps, start_epoch, progress)
    for epoch in itertools.takewhile(lambda _: not hooks.done(history), range(start_epoch, tc.epochs)):
        hooks.epoch_start(epoch, n_step)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in batches(data.train, tc.batch_size, generator=gen, augment=data.augment, device=device,
                            drop_last=drop_last):
            opt.zero_grad(set_to_none=True)
            loss, right = hooks.step(x, y, n_step)
            first = _first_unless_diverged(loss, first, tc, hooks, epoch, bar)
            if tc.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            sched.step()
            n_step += 1
            loss_sum += loss * y.numel()  # per prediction: an example, or a token of next-token data
            seen += y.numel()
            correct += right or 0
            bar.update(epoch, loss_sum / seen, correct / seen if right is not None else None)
        acc = correct / seen if seen and right is not None else None
        hooks.epoch_end(epoch, loss_sum / max(1, seen))
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "acc": acc,
                        **hooks.check(model, data.train, tc.eval_batch_size)})
        if state_path:
            save_training_state(state_path, digest, seed, epoch + 1, model, opt, sched, gen, device, step=n_step,
                                fit_history=history, runtime=record(device), first_loss=first, **hooks.state())
        bar.update(epoch, loss_sum / max(1, seen), acc, end_of_epoch=True)  # once the epoch is safe
        hooks.saved(epoch + 1)
        hooks.logged(epoch, history[-1])
    bar.close()
    return n_step


def diverged_line(loss: float, epoch: int, seed: int, state_path: str | Path | None) -> str:
    """What a regular run that diverged says (solo or stacked, `population`)."""
    kept = f"; the last good state (epoch {epoch}) is kept in {state_path}" if state_path else ""
    return (f"training diverged: loss is {loss} at epoch {epoch + 1} (seed {seed}){kept}; "
            "lower train.optimizer.lr or set train.grad_clip")


def train(cfg: Config, seed: int, *, device: str | torch.device = "auto", state_path: str | Path | None = None,
          progress: bool | None = None, init: dict[str, torch.Tensor] | None = None,
          history: list[dict] | None = None, model: nn.Module | None = None,
          data: DataBundle | None = None, on_epoch: Callable[[int, dict], None] | None = None
          ) -> tuple[nn.Module, dict]:
    """Train one model from its seed (`fit` with a cross-entropy step). -> (model in eval mode, final
    metrics on train and test); `history` (a list) receives the per-epoch training metrics. `model` and
    `data` (the Python API's live objects) replace the ones cfg.model and cfg.data would build; `model`
    is trained in place from the weights it has."""
    device = resolve_device(device)
    data = get_dataset(cfg.data) if data is None else data
    tc = cfg.train
    model = init_model(cfg, data, seed) if model is None else model
    if init is not None:
        model.load_state_dict(init)
    model.to(device)

    def step(x, y, _n):
        with autocast(device, tc.amp):
            out, yt = per_token(model(x), y)
            loss = F.cross_entropy(out.float(), yt, label_smoothing=tc.label_smoothing)
        if not torch.isfinite(loss):
            return loss.item(), None
        loss.backward()
        return loss.item(), (out.argmax(-1) == yt).sum().item()

    hooks = Hooks(step, lambda loss, epoch: diverged_line(loss, epoch, seed, state_path), desc=f"train seed {seed}", logged=on_epoch or (lambda epoch, record: None),
                  stop=StopRule.of(tc.stop))
    fit(model, data, tc, seed, config_digest(cfg), hooks, device=device, state_path=state_path, progress=progress,
        history=history)
    model.eval()
    return model, evaluate_splits(model, data, tc.eval_batch_size)
