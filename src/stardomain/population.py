"""Population training: K models of one recipe (same architecture and train section, different seeds)
trained in one stacked computation, each bitwise the model `training.train` gives it alone.

Why not torch.func.vmap: vmap turns a Linear layer into a batched matmul plus a bias add, which differs from
the solo run's `addmm` in the last bits (1.2e-7 after one forward, measured). A batched addmm (`baddbmm`)
with a backward that mirrors `addmm`'s (`_StackedLinear`) computes every member's slice with the same
kernels as its solo run, so each member is bitwise equal to one-at-a-time training and therefore does not
depend on the population it is trained in (docs/method.md, "Stacked population training"). That limits
stacking to what is exact: `nn.Sequential` MLPs of Flatten, Linear (with bias) and ReLU on CPU at one
torch thread, without gradient clipping; `unstackable` names the reason anything else is trained one model at a time.

Each member keeps everything of its own: its seeded data order, its optimiser state, its stop rule, its
divergence check and its resume file, written in exactly the solo format (`training.save_training_state`)
after every epoch, so a killed stacked run resumes to the same weights (stacked or solo). Stacks are
`engine.Stack`s, rebuilt at every epoch start from the members still training at that epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, TrainConfig
from .data import DataBundle, batches, get_dataset, num_batches
from .engine import Stack
from .errors import UserError
from .runtime import record, warn_if_changed
from .training import (Progress, StopRule, build_optimizer, build_scheduler, config_digest, divergence,
                       diverged_line, evaluate, evaluate_splits, init_model, resume_training_state,
                       save_training_state)
from .utils import resolve_device

_EXACT_LAYERS = (nn.Flatten, nn.Linear, nn.ReLU, nn.Identity)


def unstackable(model: nn.Module, data: DataBundle, tc: TrainConfig, device: str | torch.device,
                threads: int | None = None) -> str | None:
    """Why this recipe cannot be trained stacked bitwise-equal to solo training, or None when it can.
    `threads`: the torch threads it would run with (default: this process's)."""
    if resolve_device(device).type != "cpu":
        return "stacked training is bitwise-checked on CPU only"
    if (threads or torch.get_num_threads()) != 1:
        return ("stacked training is bitwise equal to solo training at one torch thread only (a solo run's "
                "multi-threaded matrix products split their sums by thread; study.cpus_per_task = 1)")
    if tc.grad_clip:
        return "train.grad_clip clips each model's own gradient norm, which stacked training does not reproduce"
    if not isinstance(model, nn.Sequential):
        return f"stacked training handles nn.Sequential MLPs, not {type(model).__name__}"
    for name, m in model.named_children():
        if not isinstance(m, _EXACT_LAYERS):
            return f"stacked training handles Flatten, Linear and ReLU layers only (layer {name} is {type(m).__name__})"
        if isinstance(m, nn.Linear) and m.bias is None:
            return f"stacked training handles Linear layers with a bias only (layer {name} has none)"
        if isinstance(m, nn.Flatten) and m.end_dim != -1:
            return f"stacked training handles Flatten to the last axis only (layer {name})"
    first_linear = next(i for i, m in enumerate(model.children()) if isinstance(m, nn.Linear))
    flat = any(isinstance(m, nn.Flatten) and m.start_dim == 1 for m in list(model.children())[:first_linear])
    if data.sequence or not (flat or len(data.input_shape) == 1):
        return "stacked training needs each example flattened to a vector before the first Linear layer"
    if next(iter(model.buffers()), None) is not None:
        return "stacked training handles models without buffers only"
    return None


def recipe_unstackable(cfg: Config, device: str | torch.device, data: DataBundle | None = None,
                       threads: int | None = None) -> str | None:
    """`unstackable` for cfg's model and train section (the model is built from seed 0; only its layers are read)."""
    data = get_dataset(cfg.data) if data is None else data
    return unstackable(init_model(cfg, data, 0), data, cfg.train, device, threads)


class _StackedLinear(torch.autograd.Function):
    """Row k = addmm(b_k, x_k, W_k^T) for K models at once; the backward is addmm's, slice by slice (the
    same gemm per slice: bmm and mm agree bitwise), so every member's gradient is its solo gradient."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        return gx, torch.bmm(g.transpose(1, 2), x), g.sum(1)


def stacked_forward(model: nn.Sequential, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits (K, batch, classes) of the K weight sets `params` (stacked state-dict entries), row k on x[k]."""
    h = x
    for name, m in model.named_children():
        if isinstance(m, nn.Flatten):
            h = h.flatten(m.start_dim + 1)
        elif isinstance(m, nn.Linear):
            h = _StackedLinear.apply(h, params[f"{name}.weight"], params[f"{name}.bias"])
        elif isinstance(m, nn.ReLU):
            h = torch.relu(h)
    return h


def stacked_batches(data: DataBundle, batch_size: int, gens: Sequence[torch.Generator], device: torch.device,
                    drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(K, batch, ...) inputs and (K, batch) labels: row k is the batch `data.batches` gives member k from its
    own generator. In-memory data without augmentation is gathered in one indexing (the same values)."""
    split = data.train
    if split.x is None or data.augment is not None:
        for parts in zip(*[batches(split, batch_size, generator=g, augment=data.augment, device=device,
                                   drop_last=drop_last) for g in gens]):
            yield torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
        return
    n = len(split)
    orders = torch.stack([torch.randperm(n, generator=g) for g in gens])
    for start in range(0, n - (n % batch_size) if drop_last else n, batch_size):
        idx = orders[:, start:start + batch_size]
        yield split.x[idx].to(device, non_blocking=True), split.y[idx].to(device, non_blocking=True)


@dataclass
class Member:
    """One model of the population, held as its solo run would hold it (module, optimiser, schedule,
    generator), so its state file is the solo run's and a resume reads it the same way."""

    seed: int
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    state_path: Path | None
    history: list[dict] = field(default_factory=list)
    epoch: int = 0  # epochs finished
    n_step: int = 0
    first: float | None = None
    loss_sum: float = 0.0
    correct: int = 0


def _member(cfg: Config, data: DataBundle, seed: int, steps: int, state_path, device) -> Member:
    """A member at its start or, when its state file belongs to this run, where that file left it."""
    model = init_model(cfg, data, seed).to(device)
    opt = build_optimizer(model.parameters(), cfg.train.optimizer)
    sched = build_scheduler(opt, cfg.train, steps)
    gen = torch.Generator().manual_seed(seed)
    m = Member(seed, model, opt, sched, gen, Path(state_path) if state_path else None)
    with torch.random.fork_rng(devices=[]):
        st = resume_training_state(m.state_path, config_digest(cfg), seed, model, opt, sched, gen, device)
    if st is not None:
        m.epoch, m.first = st["epoch"], st.get("first_loss")
        m.n_step = st.get("step", m.epoch * steps)
        m.history = list(st.get("fit_history") or [])
        warn_if_changed(st.get("runtime"), record(device), what=f"train seed {seed}")
    return m


def _stack_of(members: Sequence[Member], tc: TrainConfig, steps: int):
    """The members' weights as stacked leaves, with one optimiser and schedule over them whose state is
    theirs stacked (optimisers are elementwise; members at one epoch share the schedule's state)."""
    stack = Stack.of([dict(m.model.named_parameters()) for m in members])  # the modules' parameter order
    leaves = {n: v.detach().requires_grad_() for n, v in stack.tensors.items()}
    opt = build_optimizer(list(leaves.values()), tc.optimizer)
    sched = build_scheduler(opt, tc, steps)
    states = [m.opt.state_dict() for m in members]
    joined = {i: {k: (torch.stack([s["state"][i][k] for s in states]) if v is not None and v.dim() else v)
                  for k, v in st.items()} for i, st in states[0]["state"].items()}
    opt.load_state_dict({"state": joined, "param_groups": states[0]["param_groups"]})
    sched.load_state_dict(members[0].sched.state_dict())
    return leaves, opt, sched


def _unstack(members: Sequence[Member], leaves: dict, opt, sched) -> None:
    """Write row k of the stack back into member k's own module, optimiser and schedule."""
    full = opt.state_dict()
    for k, m in enumerate(members):
        m.model.load_state_dict({n: v[k].detach() for n, v in leaves.items()})
        state = {i: {key: (v[k] if v is not None and v.dim() else v) for key, v in st.items()}
                 for i, st in full["state"].items()}
        m.opt.load_state_dict({"state": state, "param_groups": full["param_groups"]})
        m.sched.load_state_dict(sched.state_dict())


@dataclass
class _Run:
    """What every epoch of one population run reads."""

    cfg: Config
    data: DataBundle
    steps: int
    drop_last: bool
    device: torch.device
    rule: StopRule | None
    bar: Progress


def _epoch(run: _Run, members: list[Member], epoch: int) -> None:
    """One epoch of the members that are at `epoch`: each its own batches, one stacked step for all."""
    tc = run.cfg.train
    leaves, opt, sched = _stack_of(members, tc, run.steps)
    for m in members:
        m.loss_sum, m.correct = 0.0, 0
    seen = 0
    for x, y in stacked_batches(run.data, tc.batch_size, [m.gen for m in members], run.device, run.drop_last):
        opt.zero_grad(set_to_none=True)
        out = stacked_forward(members[0].model, leaves, x)
        losses = torch.stack([F.cross_entropy(out[k].float(), y[k], label_smoothing=tc.label_smoothing)
                              for k in range(len(members))])
        values = losses.tolist()
        for m, v in zip(members, values):
            _check_divergence(m, v, tc, epoch, run.bar)
        losses.sum().backward()
        opt.step()
        sched.step()
        right = (out.detach().argmax(-1) == y).sum(1).tolist()
        seen += y.shape[1]
        for m, v, r in zip(members, values, right):
            m.n_step += 1
            m.loss_sum += v * y.shape[1]
            m.correct += r
        run.bar.update(epoch, sum(m.loss_sum for m in members) / (seen * len(members)), None)
    _unstack(members, leaves, opt, sched)
    for m in members:
        _finish_epoch(run, m, epoch, seen)
    run.bar.update(epoch, sum(m.loss_sum for m in members) / max(1, seen * len(members)), None, end_of_epoch=True)


def _check_divergence(m: Member, loss: float, tc: TrainConfig, epoch: int, bar: Progress) -> None:
    """The solo run's divergence stop (training.divergence), for member `m`."""
    m.first = loss if m.first is None else m.first
    grown = divergence(loss, m.first, tc.divergence_factor)
    if grown is not None:
        bar.close()
        raise UserError(diverged_line(loss, epoch, m.seed, m.state_path) + grown)


def _finish_epoch(run: _Run, m: Member, epoch: int, seen: int) -> None:
    """The solo run's epoch end for member `m`: its history record (with the stop rule's check) and its
    state file."""
    tc = run.cfg.train
    check = {} if run.rule is None else {"check": evaluate(m.model, run.data.train, tc.eval_batch_size)}
    m.history.append({"epoch": epoch + 1, "loss": m.loss_sum / max(1, seen), "acc": m.correct / seen if seen else None,
                      **check})
    m.epoch = epoch + 1
    if m.state_path:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m.seed)  # the solo run's global generator, untouched by these models
            save_training_state(m.state_path, config_digest(run.cfg), m.seed, m.epoch, m.model, m.opt, m.sched,
                                m.gen, run.device, step=m.n_step, fit_history=m.history,
                                runtime=record(run.device), first_loss=m.first)


def train_population(cfg: Config, seeds: Sequence[int], *, device: str | torch.device = "cpu",
                     state_paths: Sequence[str | Path | None] | None = None, progress: bool | None = None,
                     data: DataBundle | None = None) -> list[tuple[nn.Module, dict, list[dict]]]:
    """Train one model per seed, stacked; member k is bitwise `training.train(cfg, seeds[k])`. Each member
    resumes from its own state file (`state_paths[k]`, the solo format) and stops by its own rule.
    -> per seed (model in eval mode, final train/test metrics, per-epoch history). A recipe `unstackable`
    refuses is a UserError here (callers that may fall back ask `unstackable` first)."""
    device = resolve_device(device)
    data = get_dataset(cfg.data) if data is None else data
    tc = cfg.train
    if len(set(seeds)) != len(seeds):
        raise UserError(f"population seeds must differ (got {list(seeds)})")
    reason = recipe_unstackable(cfg, device, data)
    if reason:
        raise UserError(f"cannot train stacked: {reason}")
    drop_last = len(data.train) > tc.batch_size
    steps = num_batches(data.train, tc.batch_size, drop_last=drop_last)
    paths = list(state_paths) if state_paths is not None else [None] * len(seeds)
    members = [_member(cfg, data, s, steps, p, device) for s, p in zip(seeds, paths)]
    rule = StopRule.of(tc.stop)
    start = min(m.epoch for m in members)
    run = _Run(cfg, data, steps, drop_last, device, rule,
               Progress(f"train {len(seeds)} seeds stacked", tc.epochs, steps, start, progress))
    for epoch in range(start, tc.epochs):
        active = [m for m in members if m.epoch == epoch and not (rule and rule.met_by(m.history))]
        if active:
            _epoch(run, active, epoch)
    run.bar.close()
    out = []
    for m in members:
        m.model.eval()
        out.append((m.model, evaluate_splits(m.model, data, tc.eval_batch_size), m.history))
    return out
