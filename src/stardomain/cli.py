"""The `stardomain` command: thin wrappers that parse, call the library, print.

One boundary (main): a UserError, a usage error or a known failure of the user's inputs (files,
encodings, nesting, memory) becomes one line on stderr and exit code 2; anything else one line saying
where its traceback was written, exit code 1 (--debug or STARDOMAIN_DEBUG=1 prints the traceback).
"""

from __future__ import annotations

import contextvars
import errno
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.20 ships its own copy of click; older ones use click itself
    from typer._click import exceptions as _clickx
except ImportError:  # pragma: no cover
    from click import exceptions as _clickx

from .config import AlignMethod, AlignVariant, Executor, MatchInit
from .errors import UserError

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Study how trained networks sit in weight space: train populations, align them modulo "
    "permutations, measure barriers, train star models (Starlight), average over star domains. Where a "
    "command has a JSON result, --json prints it on stdout and --json-out PATH writes it to a file.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (sections data, model, train, ...). "
                         "Omitted: the defaults (MNIST, MLP width 16).")
SetOpt = typer.Option([], "--set", "-s", help="Dotted override, repeatable: --set train.epochs=5 "
                      "--set model.kwargs.width=32")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda, cuda:N or mps.")
ThreadsOpt = typer.Option(None, "--threads", min=1, max=1024, help="CPU threads for torch. Default: "
                          "OMP_NUM_THREADS, else the scheduler's allocation (SLURM_CPUS_PER_TASK, ...), else 1 "
                          "(fast on a busy machine). Weights depend on it bitwise; model files record it.")
ForceOpt = typer.Option(False, "--force", help="Replace an existing output file even if it is not an earlier "
                        "output of this same command and job (without it such a file is refused).")
TensorboardOpt = typer.Option(None, "--tensorboard", metavar="DIR", help="Also log the per-epoch training "
                              "metrics for TensorBoard under DIR (needs the tensorboard package; without it, one "
                              "warning and training goes on).")
SEED_MAX = 2**63 - 1
AllowOpt = typer.Option([], "--allow-factory", metavar="PKG.MOD:FN",
                        help="Let a model file's metadata name this user model/data factory (imports and runs "
                        "its code; repeatable; also STARDOMAIN_ALLOW_FACTORIES=a:b,c:d). Without it such a "
                        "file is refused; registered models and data sets never need it.")


LearnedOpt = typer.Option([], "--learned", help="A setting of --method ste or sinkhorn, repeatable: --learned "
                          "steps=200 --learned lr=0.01 (steps, lr, loss_at=midpoint|random, batch_size, "
                          "select_examples, select_every, temperature, sinkhorn_iters; docs/method.md).")


BarrierMethodOpt = typer.Option(AlignMethod.weight, "--method", help="How B is aligned: weight matching, "
                                "activation matching, ste or sinkhorn (learned from the loss along the path; "
                                "see --learned).")


def learned_settings(items: List[str], method: str):
    """--learned KEY=VALUE items -> the settings of a learned method (None for the others); refused unless
    the method learns."""
    from .config import LEARNED_METHODS, LearnedAlignConfig, apply_overrides, validate

    if items and method not in LEARNED_METHODS:
        raise UserError(f"--learned applies to --method {' or '.join(LEARNED_METHODS)} only, not {method}")
    return validate(LearnedAlignConfig, apply_overrides({}, list(items)), "--learned") if items else None


def seed_opt(help_: str):
    return typer.Option(0, "--seed", min=0, max=SEED_MAX, help=help_)


def use_threads(threads: Optional[int]) -> int:
    from .runtime import use_threads as _use

    return _use(threads)


def allow_factories(specs: List[str]) -> None:
    from .safety import allow

    allow(specs)


_DEBUG = {"on": False}


def _print_version(value: bool) -> None:
    if value:
        from ._version import __version__

        typer.echo(f"stardomain {__version__}")
        raise typer.Exit()


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Print the full traceback of any error."),
            version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                         help="Print the version and exit.")):
    _DEBUG["on"] = _DEBUG["on"] or debug


JSON_DIGITS = 6  # significant digits of the floats a result's JSON shows (float32 results hold ~7)


def result_json(obj):
    """A command's JSON result as --json prints it and --json-out writes it: plain JSON, floats rounded
    to JSON_DIGITS significant digits so it reads well (results.json, a study's file, keeps 12)."""
    from .utils import json_safe, round_floats

    return round_floats(json_safe(obj), JSON_DIGITS)


def echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


def sources_with_extra(ctx: typer.Context, sources: List[Path], command: str) -> List[Path]:
    """`--sources F1 F2 F3`: typer binds F1 to the option, the rest arrive as extra arguments."""
    extra = list(ctx.args)
    if any(a.startswith("-") for a in extra):
        raise UserError(f"unknown option {next(a for a in extra if a.startswith('-'))}; see stardomain {command} --help")
    return list(sources) + [Path(a) for a in extra]


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Model file to write (.safetensors)."),
    config: Optional[Path] = ConfigOpt,
    seed: int = seed_opt("Fixes initialisation, shuffling and augmentation."),
    set_: List[str] = SetOpt,
    role: str = typer.Option("source", "--role", help="Recorded in the metadata: source, heldout, ..."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceOpt,
    tensorboard: Optional[Path] = TensorboardOpt,
):
    """Train one model from a seed and write a self-describing .safetensors file.

    Example: stardomain train --config configs/mnist_mlp.yaml --seed 0 --out runs/m0.safetensors
    """
    from .checkpoint import prepare_training_outputs
    from .config import load_config
    from .tblog import epoch_log
    from .files import train_to_file

    use_threads(threads)
    cfg = load_config(config, set_)
    prepare_training_outputs(out, "train", {"role": role, "seed": seed, "config": cfg.model_dump()}, force=force,
                             inputs=[config])
    log = epoch_log(tensorboard, "train")
    try:
        meta = train_to_file(cfg, seed, out, role=role, device=device, on_epoch=log)
    finally:
        if log is not None:
            log.close()
    m = meta["metrics"]
    typer.echo(f"wrote {out}  train loss {m['train']['loss']:.4f} acc {m['train']['acc']:.4f}  "
               f"test loss {m['test']['loss']:.4f} acc {m['test']['acc']:.4f}")


@app.command()
def info(path: Path = typer.Argument(..., help="A model file written by stardomain."),
         json_: bool = typer.Option(False, "--json", help="Print the whole metadata as JSON.")):
    """Show how a model file was made: architecture, data, seed, role, metrics, sha256 (imports nothing)."""
    from .checkpoint import read_model_file
    from .safety import config_factories

    sd, meta = read_model_file(path)
    if json_:
        echo_json(meta)
        return
    n_params = sum(t.numel() for t in sd.values())
    m = meta.get("metrics") or {}
    lines = [
        f"file      {path}",
        f"model     {meta['model'].get('name') or meta['model'].get('factory')} {meta['model'].get('kwargs', {})}"
        f"  ({n_params:,} numbers in {len(sd)} tensors)",
        f"data      {meta['data'].get('name')}  input {tuple(meta['data'].get('input_shape', ()))}  "
        f"classes {meta['data'].get('num_classes')}",
        f"seed      {meta['seed']}",
        f"role      {meta['role']}",
    ]
    for split in ("train", "test"):
        if split in m:
            lines.append(f"{split:<9} loss {m[split]['loss']:.4f}  acc {m[split]['acc']:.4f}")
    for key in ("runtime", "sources", "alignment", "star"):
        if key in meta:
            lines.append(f"{key:<9} {json.dumps(meta[key])[:200]}")
    for f in config_factories({"model": meta["model"], "data": meta["data"]["config"]}):
        lines.append(f"factory   names user code {f!r}: eval, spec, align, barrier and bma import it only with "
                     f"--allow-factory '{f}' (info imports nothing)")
    lines += [f"sha256    {meta['sha256']}", f"versions  {meta.get('versions', {})}",
              f"format    {meta['format_version']}: " + (
                  "metadata and weights covered by its digest" if meta.get("digest") else
                  "only the weights are covered by sha256; the metadata is not (written by an older stardomain)")]
    typer.echo("\n".join(lines))


@app.command("eval")
def eval_(path: Path = typer.Argument(..., help="A model file written by stardomain."),
          json_: bool = typer.Option(False, "--json", help='Print {"train": {"loss", "acc"}, "test": {...}}.'),
          batch_size: int = typer.Option(1000, "--batch-size", min=1),
          device: str = DeviceOpt,
          threads: Optional[int] = ThreadsOpt,
          allow_factory: List[str] = AllowOpt):
    """Loss and accuracy (a fraction) on the training split (no augmentation) and the test split."""
    from .checkpoint import data_from_meta, load_model
    from .training import evaluate_splits, resolve_device

    use_threads(threads)
    allow_factories(allow_factory)
    model, meta = load_model(path, resolve_device(device))
    res = evaluate_splits(model, data_from_meta(meta, str(path)), batch_size)
    if json_:
        echo_json(result_json(res))
    else:
        for split, r in res.items():
            typer.echo(f"{split:<6} loss {r['loss']:.4f}  acc {r['acc']:.4f}")


@app.command(context_settings={"allow_extra_args": True})
def star(
    ctx: typer.Context,
    sources: List[Path] = typer.Option(..., "--sources", help="Source model files (trained with the same model "
                                       "and data config): --sources runs/s0.safetensors runs/s1.safetensors ... "
                                       "(or a shell glob; repeating --sources works too)"),
    out: Path = typer.Option(..., "--out", "-o", help="Star model file to write (.safetensors)."),
    config: Optional[Path] = ConfigOpt,
    seed: int = seed_opt("Fixes the star's initialisation, data order and (source, t) draws."),
    set_: List[str] = SetOpt,
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceOpt,
    tensorboard: Optional[Path] = TensorboardOpt,
):
    """Train a star model with Starlight (docs/method.md, "Starlight") from source model files.

    Each mini-batch goes through (1-t)*star + t*source for a random source and t.

    Settings: the `star` config section (t_sampling, beta, mu, align_every, init, chunks, bn_batches, train).

    A killed run resumes from OUT.state when re-run with the same arguments.

    Example: stardomain star --config c.yaml --sources runs/s*.safetensors --out runs/star.safetensors --set star.chunks=4
    """
    from .checkpoint import prepare_training_outputs, read_model_file, read_model_meta
    from .config import load_config
    from .files import star_to_file
    from .tblog import epoch_log

    use_threads(threads)
    sources = sources_with_extra(ctx, sources, "star")
    cfg = load_config(config, set_)
    shas = [(read_model_meta(p) or read_model_file(p)[1])["sha256"] for p in sources]
    prepare_training_outputs(out, "star", {"role": "star", "seed": seed, "config": cfg.model_dump(),
                                           "sources": [{"sha256": h} for h in shas]},
                             force=force, inputs=[config, *sources])
    log = epoch_log(tensorboard, "star")
    try:
        meta = star_to_file(cfg, [str(p) for p in sources], out, seed=seed, device=device, on_epoch=log)
    finally:
        if log is not None:
            log.close()
    m = meta["metrics"]
    typer.echo(f"wrote {out}  ({len(sources)} sources)  train loss {m['train']['loss']:.4f} acc "
               f"{m['train']['acc']:.4f}  test loss {m['test']['loss']:.4f} acc {m['test']['acc']:.4f}")


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Study config (YAML). Omitted: the embedded default "
                                            "(MNIST, MLP width 16, 10 sources, 5 held-outs, a star, all pairs)."),
    out: Path = typer.Option(..., "--out", "-o", help="Study folder: results.json, report.md/.html, plots/, "
                             "models/, cache/. Re-running with the same folder resumes and reuses finished work."),
    executor: Executor = typer.Option(Executor.local, "--executor", help="local (this machine; --workers processes) "
                                      "or ray."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster (e.g. auto or "
                                              "host:6379); without it --executor ray starts a local one."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, max=1024, help="Study tasks run at once, each "
                                          "with --threads threads (local: a pool of N processes, default 1; ray: "
                                          "default as many as the cluster's CPUs allow). Results do not depend on it."),
    set_: List[str] = SetOpt,
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps for every task "
                                         "(the same as --set study.device=...; default: the config's, auto)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024, help="CPU threads per task (the "
                                          "same as --set study.cpus_per_task=N; default: the config's, 1). "
                                          "Results depend on it bitwise; model files record it."),
    force: bool = typer.Option(False, "--force", help="Use --out even if it is a non-empty folder that is not a "
                               "study folder (without it such a folder is refused)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Replicate the study over these study seeds (e.g. "
                                        "0-4 or 0,1,2): one study each in OUT/seed-N (disjoint models), then one "
                                        "combined verdict (OUT/combined.json; docs/method.md, 'The headline test')."),
):
    """Run the star-domain study: train sources and held-outs, train the star, measure every pair's barrier,
    test star–held-out < regular–regular, and write results.json, report.md and a self-contained report.html.

    Example: stardomain run configs/default.yaml --out runs/default --set study.n_sources=5

    Killed at any point, the same command resumes and ends with an identical results.json. One run at a
    time uses a study folder: a second run on it exits with code 2 saying which process holds it.
    """
    from .config import load_config
    from .study import default_config_path, run_study

    path = config or default_config_path()
    set_ = list(set_) + ([f"study.device={device}"] if device else []) + \
        ([f"study.cpus_per_task={threads}"] if threads else [])
    cfg = load_config(path, set_)
    if out.is_dir():
        from .runtime import warn_if_study_changed
        from .training import resolve_device

        warn_if_study_changed(out, cfg.study.cpus_per_task, resolve_device(cfg.study.device))
    def run_one(c, folder):
        return run_study(c, folder, executor=Executor(executor).value, ray_address=ray_address, num_workers=workers,
                         force=force)

    if seeds is not None:
        return _run_replicates(cfg, out, seeds, run_one, force)
    res = run_one(cfg, out)
    typer.echo(res["verdict_line"])
    typer.echo("")
    typer.echo(res["verdict"])
    typer.echo(f"wrote {out}/results.json, {out}/report.md, {out}/report.html")


def _parse_ns(ns: str | None) -> tuple[int, ...] | None:
    """--ns 1,2,5 -> (1, 2, 5)."""
    try:
        n_list = tuple(int(v) for v in ns.split(",") if v.strip()) if ns else None
    except ValueError:
        raise UserError(f"--ns must be comma-separated integers such as 1,2,5 (got {ns[:40]!r})") from None
    if n_list and min(n_list) < 1:
        raise UserError(f"--ns values must be at least 1 (got {min(n_list)})")
    return n_list or None


def _run_replicates(cfg, out: Path, seeds: str, run_one, force: bool) -> None:
    """`run --seeds`: one study per study seed, each verdict line, then the combined one."""
    from .study.replicates import parse_seeds, run_replicates

    res = run_replicates(cfg, out, parse_seeds(seeds), run_one=run_one, force=force)
    for s, line in zip(res["seeds"], res["replicates"]):
        typer.echo(f"study seed {s}: {line}")
    typer.echo("")
    typer.echo(f"Combined over {len(res['seeds'])} study seeds: {res['verdict_line']}")
    typer.echo(f"wrote {out}/combined.json and one study folder per seed ({out}/seed-N)")


@app.command("bma", context_settings={"allow_extra_args": True})
def bma_(
    ctx: typer.Context,
    sources: List[Path] = typer.Option(..., "--sources", help="Source model files: --sources F1 F2 ... "
                                       "(or a shell glob; repeating --sources works too)."),
    star: Path = typer.Option(..., "--star", help="The star model file; its metadata names the data and model."),
    k: int = typer.Option(32, "--k", min=1, max=100_000, help="Models sampled per BMA run."),
    seeds: int = typer.Option(3, "--seeds", min=1, max=10_000, help="Evaluation seeds: BMA draws repeated this many times (CIs)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX - 10_000, help="First evaluation seed."),
    json_: bool = typer.Option(False, "--json", help="Print the per-predictor metrics as JSON on stdout."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the per-predictor metrics here (JSON)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Reliability diagrams + metric-vs-K curves (PNG)."),
    fusion: Optional[Path] = typer.Option(None, "--fusion", help="A mu > 0 star to score as one more predictor."),
    ns: Optional[str] = typer.Option(None, "--ns", help="Also score with only the first n sources, e.g. 1,2,5."),
    align: bool = typer.Option(True, "--align/--no-align", help="Weight-match sources before interpolating."),
    bn_batches: Optional[int] = typer.Option(None, "--bn-batches", min=1, help="Training batches per BN recalibration "
                                             "(default: the whole training split)."),
    ood: bool = typer.Option(True, "--ood/--no-ood", help="OOD AUROC against inverted / rotated / noise images."),
    report: Optional[Path] = typer.Option(None, "--report", help="Also write the markdown BMA section here."),
    device: str = DeviceOpt,
    threads: Optional[int] = ThreadsOpt,
    force: bool = ForceOpt,
    allow_factory: List[str] = AllowOpt,
):
    """Bayesian model averaging over the star domain vs a deep ensemble, single models, the star alone,
    regular-domain BMA and the aligned weight average: accuracy, NLL, Brier, ECE, ACE, misclassification
    and OOD AUROC, seconds per predictor.

    Example: stardomain bma --star runs/star.safetensors --sources runs/s0.safetensors runs/s1.safetensors
    --k 32 --seeds 3 --json-out runs/bma.json --plot runs/bma.png
    """
    from .averaging import BMASettings
    from .checkpoint import atomic_write_json, atomic_write_text, check_distinct, check_output
    from .files import bma_files
    from .report.averaging import report_section
    from .report.averaging import table as bma_table

    use_threads(threads)
    allow_factories(allow_factory)
    files = sources_with_extra(ctx, sources, "bma")
    check_distinct(**{"json-out": json_out, "plot": plot, "report": report})
    for path, kind, opt in ((json_out, "bma.json", "--json-out"), (plot, "bma.png", "--plot"),
                            (report, "bma.md", "--report")):
        check_output(path, kind, force=force, inputs=[star, *files, fusion], option=opt)
    settings = BMASettings(k=k, seed=seed, seeds=seeds, align=align, ns=_parse_ns(ns), bn_batches=bn_batches, ood=ood)
    res = bma_files(star, [str(f) for f in files], settings, fusion_path=fusion, plot=plot, device=device,
                    progress=lambda s: typer.echo(f"  {s}", err=True))
    if report:
        atomic_write_text(report, report_section(res))
    if json_out:
        atomic_write_json(json_out, result_json(res))
    if json_:
        echo_json(result_json(res))
        return
    typer.echo(bma_table(res))  # every metric descriptor the result has (stardomain.metrics.METRICS)
    wrote = [str(p) for p in (json_out, plot, report) if p]
    if wrote:
        typer.echo(f"wrote {' and '.join(wrote)}")


@app.command("align")
def align_(a: Path = typer.Argument(..., help="Reference model file (A)."),
           b: Path = typer.Argument(..., help="Model file to permute (B)."),
           out: Path = typer.Option(..., "--out", "-o", help="Where to write pi(B) (.safetensors)."),
           method: AlignMethod = typer.Option(AlignMethod.weight, "--method", help="weight (weight matching), "
                                              "activation (correlation of activations on training data), ste "
                                              "(straight-through estimator) or sinkhorn (Sinkhorn re-basin): the "
                                              "last two learn from the loss along the path (slower; see --learned)."),
           learned: List[str] = LearnedOpt,
           seed: int = seed_opt("Order of the coordinate descent."),
           init: Optional[MatchInit] = typer.Option(None, "--init", help="Start of weight matching (--method "
                                                    "weight only): informed (the default; first pass in trace "
                                                    "order, each group on what is known; recovers permuted copies "
                                                    "exactly), identity (the paper's algorithm) or sorted."),
           only: AlignVariant = typer.Option(AlignVariant.full, "--only", help="Which permutation groups to "
                                             "align (see `stardomain spec`): all of them (full), only attention "
                                             "heads, only MLP hidden units, only the residual stream; the rest "
                                             "stay as they are."),
           json_: bool = typer.Option(False, "--json", help="Print the record as JSON on stdout."),
           json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the record as JSON here."),
           threads: Optional[int] = ThreadsOpt,
           force: bool = ForceOpt,
           allow_factory: List[str] = AllowOpt,
           strict: bool = typer.Option(False, "--strict", help="Exit with code 2, writing nothing, when the "
                                       "model's graph cannot be captured or nothing in it is permutable "
                                       "(otherwise a warning on stderr, and B is written unchanged).")):
    """Permute B's hidden units to best match A without changing B's function (checked).

    The output keeps B's metadata plus an `alignment` record (method, permutation, A's sha256).
    Example: stardomain align runs/m0.safetensors runs/m1.safetensors --out runs/m1_to_m0.safetensors
    """
    from .checkpoint import atomic_write_json, check_distinct, check_output, read_model_file, read_model_meta
    from .permute.files import align_files

    use_threads(threads)
    allow_factories(allow_factory)
    method = AlignMethod(method)
    if init is not None and method is not AlignMethod.weight:
        raise UserError(f"--init applies to --method weight only, not {method.value}")
    settings = learned_settings(learned, method.value)
    init = MatchInit(init or "informed")
    sha = [(read_model_meta(p) or read_model_file(p)[1])["sha256"] for p in (a, b)]
    check_distinct(**{"out": out, "json-out": json_out})
    check_output(out, "align", {"alignment": {"reference_sha256": sha[0], "source_sha256": sha[1]}}, force=force,
                 inputs=[a, b])
    check_output(json_out, "align.json", force=force, inputs=[a, b], option="--json-out")
    rec = align_files(a, b, out, method=method.value, seed=seed, init=init.value, strict=strict,
                      variant=AlignVariant(only).value, learned=settings)
    for w in rec.get("warnings", []):
        typer.echo(f"warning: {w}", err=True)
    if json_out:
        atomic_write_json(json_out, result_json(rec))
    if json_:
        echo_json(result_json(rec))
        return
    only_txt = "" if rec["variant"] == "full" else f" ({rec['variant']} only)"
    typer.echo(f"wrote {out}  method {rec['method']}{only_txt}  iterations {rec['iterations']}  "
               f"parameter L2 distance to A {rec['distance_before']:.4f} -> {rec['distance_after']:.4f}  "
               f"equivalence error {rec['equivalence_error']:.2e}  {rec['seconds']:.2f}s")


@app.command("import")
def import_(weights: Path = typer.Argument(..., help="A safetensors state dict, or a Hugging Face model folder "
                                          "(its *.safetensors shards). Pickled .bin/.pt files are refused."),
            model_factory: str = typer.Option(..., "--model-factory", help="'package.module:function' building "
                                              "the architecture the weights belong to."),
            kwargs: str = typer.Option("{}", "--kwargs", help="JSON object of keyword arguments for the factory."),
            data: str = typer.Option(..., "--data", help="Data set name (e.g. digits, mnist) or a JSON data config: "
                                     "what the model file says it was made for."),
            example: Optional[str] = typer.Option(None, "--example", help="JSON of keyword inputs for models that "
                                                  "do not take images, e.g. '{\"input_ids\": {\"shape\": [16], "
                                                  "\"dtype\": \"int64\", \"high\": 30522}}'."),
            out: Path = typer.Option(..., "--out", "-o", help="The model file to write (.safetensors)."),
            force: bool = ForceOpt):
    """Wrap third-party weights as a stardomain model file, so spec, align, barrier and bma read it.

    Example: stardomain import ./bert-tiny --model-factory mypkg.models:tiny_bert --data digits
    --example '{"input_ids": {"shape": [16], "dtype": "int64", "high": 1000}}' --out bert0.safetensors
    """
    from .checkpoint import check_output
    from .permute.files import import_weights

    def parse(text, what):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{what} is not valid JSON ({e.msg}): {text!r}") from None
        return value

    kw = parse(kwargs, "--kwargs")
    if not isinstance(kw, dict):
        raise UserError(f"--kwargs must be a JSON object, got {kwargs!r}")
    d = parse(data, "--data") if data.lstrip().startswith("{") else data
    ex = parse(example, "--example") if example else None
    check_output(out, "import", {"imported": {"factory": model_factory, "kwargs": kw}}, force=force, inputs=[weights])
    meta = import_weights(weights, model_factory, kw, d, out, example=ex)
    typer.echo(f"wrote {out}  ({model_factory}, {len(meta['imported']['weights'])} weight file(s), "
               f"sha256 {meta['sha256'][:12]})")


@app.command("spec")
def spec_(path: Path = typer.Argument(..., help="A model file written by stardomain."),
          json_: bool = typer.Option(False, "--json", help="Print the spec as JSON (plain data)."),
          threads: Optional[int] = ThreadsOpt,
          allow_factory: List[str] = AllowOpt):
    """Show the permutation groups derived from the model's traced graph, their sizes, what stays
    unpermuted and why, and the fraction of parameters that can be permuted.

    Example: stardomain spec runs/m0.safetensors
    """
    from .permute.files import spec_file

    use_threads(threads)
    allow_factories(allow_factory)
    spec, _ = spec_file(path)
    if json_:
        echo_json(spec.to_dict())
    else:
        typer.echo(spec.summary())


@app.command("barrier")
def barrier_(a: Path = typer.Argument(..., help="Model file A (t = 0)."),
             b: Path = typer.Argument(..., help="Model file B (t = 1); weight-matched to A first unless --no-align."),
             json_: bool = typer.Option(False, "--json", help="Print the barrier record as JSON on stdout."),
             json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the barrier record here (JSON)."),
             plot_out: Optional[Path] = typer.Option(None, "--plot", help="Also write a PNG of loss/accuracy vs t."),
             points: int = typer.Option(11, "--points", min=3, max=10_001, help="Evenly spaced t values from 0 to 1 (11: 0, 0.1, ..., 1)."),
             no_align: bool = typer.Option(False, "--no-align", help="Interpolate B as it is, without weight "
                                           "matching (the same as --align none)."),
             align: Optional[AlignVariant] = typer.Option(None, "--align", help="Which permutation groups weight "
                                                          "matching aligns: all (full, the default), only "
                                                          "attention heads, only MLP hidden units, only the "
                                                          "residual stream, or none."),
             align_method: AlignMethod = BarrierMethodOpt, learned: List[str] = LearnedOpt,
             bn_batches: Optional[int] = typer.Option(None, "--bn-batches", min=1, help="Training batches (of 1000) that "
                                                      "recompute BatchNorm statistics at interior t; default: all."),
             refine: int = typer.Option(0, "--refine", min=0, max=1000, help="Extra t values searched around the worst grid point."),
             seed: int = seed_opt("Seed of weight matching's random group order."),
             repair: bool = typer.Option(False, "--repair", help="Networks without BatchNorm: REPAIR-renormalise "
                                         "hidden channels at interior t (Jordan et al. 2023)."),
             temperature: bool = typer.Option(False, "--temperature", help="Also the loss barriers after "
                                              "temperature scaling every point (T fitted by NLL on the data set's "
                                              "val split, else on a seeded 20% of test, then left out)."),
             device: str = DeviceOpt,
             threads: Optional[int] = ThreadsOpt,
             force: bool = ForceOpt,
             allow_factory: List[str] = AllowOpt):
    """Loss and accuracy along (1-t)·A + t·B on train and test, and the barriers (docs/method.md).

    Loss barrier: max over interior t of loss minus its chord, floored at 0. Accuracy barrier: the
    largest drop of accuracy below its chord (a positive fraction). BatchNorm statistics are recomputed
    on training data at every interior t.

    Example: stardomain barrier runs/m0.safetensors runs/m1.safetensors --json-out b01.json --plot b01.png
    """
    from .barriers import BarrierSettings
    from .checkpoint import atomic_write_json, check_distinct, check_output
    from .files import measure_files
    from .report.barriers import plot

    variant = _barrier_variant(no_align, align)
    use_threads(threads)
    allow_factories(allow_factory)
    check_distinct(**{"json-out": json_out, "plot": plot_out})
    for path, kind, opt in ((json_out, "barrier.json", "--json-out"), (plot_out, "barrier.png", "--plot")):
        check_output(path, kind, force=force, inputs=[a, b], option=opt)
    settings = BarrierSettings(points=points, align=variant, bn_batches=bn_batches, refine=refine, seed=seed,
                               repair=repair, temperature=temperature, align_method=align_method.value,
                               learned=learned_settings(learned, align_method.value))
    rec = measure_files(a, b, settings, device=device)
    if json_out is not None:
        atomic_write_json(json_out, result_json(rec))
    if plot_out is not None:
        plot(rec, plot_out, title=f"{a.name} → {b.name} ({_how_aligned(variant, align_method.value)})")
    if json_:
        echo_json(result_json(rec))
        return
    _print_barrier(rec, _how_aligned(variant, align_method.value))
    wrote = [str(p) for p in (json_out, plot_out) if p]
    if wrote:
        typer.echo(f"wrote {' and '.join(wrote)}")


def _barrier_variant(no_align: bool, align: AlignVariant | None) -> str:
    if no_align and align not in (None, AlignVariant.none):
        raise UserError(f"--no-align and --align {AlignVariant(align).value} contradict each other; give one")
    return "none" if no_align else AlignVariant(align or "full").value


def _how_aligned(variant: str, method: str) -> str:
    from .permute.variants import in_words

    return in_words(variant) + ("" if variant == "none" or method == "weight" else f" by {method}")


def _print_barrier(rec: dict, how_aligned: str) -> None:
    br = rec["barrier"]
    typer.echo(f"barrier  train loss {br['train_loss']:.4f} (t={br['train_loss_t']})  test loss "
               f"{br['test_loss']:.4f}  train acc drop {br['train_acc']:.4f}  test acc drop {br['test_acc']:.4f}"
               f"  [{how_aligned}, {rec['timings']['total_s']:.1f}s]")
    if "temperature_scaled" in rec:
        typer.echo(f"temperature-scaled: train loss {br['train_loss_ts']:.4f}  test loss {br['test_loss_ts']:.4f}  "
                   f"(calibrated on {rec['temperature_scaled']['calibration']['source']})")


@app.command("config")
def config_(path: Optional[Path] = typer.Argument(None, help="A YAML config. Omitted: the defaults, what train "
                                                  "and star use without --config (run without a config uses "
                                                  "the study config printed by: stardomain config --study)."),
            study: bool = typer.Option(False, "--study", help="Start from run's embedded default study config "
                                       "instead of the bare defaults (not with FILE)."),
            set_: List[str] = SetOpt,
            json_: bool = typer.Option(False, "--json", help="Print it as JSON instead of YAML.")):
    """Print the resolved config: the file with --set overrides and every default filled in.

    What train, star and run would use, as YAML (or JSON with --json); it reads back as the same config.

    Example: stardomain config configs/mnist_mlp.yaml --set train.epochs=3
    """
    import yaml

    from .config import load_config

    if study and path is not None:
        raise UserError("give either FILE or --study, not both")
    if study:
        from .study import default_config_path

        path = default_config_path()
    cfg = load_config(path, set_).model_dump(mode="json")
    if json_:
        echo_json(cfg)
    else:
        typer.echo(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None).rstrip())


# ---- the one boundary between the user and everything else ----

_IO_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "not permitted", errno.EROFS: "read-only file system",
              errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EISDIR: "is a folder, not a file", errno.ENOENT: "no such file or folder",
              errno.ENOTDIR: "a part of the path is not a folder", errno.ENAMETOOLONG: "file name too long",
              errno.EEXIST: "already exists (as a file where a folder is needed?)"}


def _user_message(e: BaseException) -> str | None:
    """The one line for a failure the user can fix, or None when it is a bug (or unknown)."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.errno in _IO_ERRNOS:
        where = e.filename if e.filename is not None else "a file"
        return f"{where}: {_IO_ERRNOS[e.errno]}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file stardomain read is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    if isinstance(e, RecursionError):
        return "an input is nested too deeply to read"
    if isinstance(e, MemoryError):
        return "out of memory: an input or a setting asks for more memory than this machine has"
    return None


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _write_traceback(e: BaseException) -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="stardomain-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"stardomain {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(type(e), e, e.__traceback__, file=f)
    return path


def _click_error(e) -> int:
    """A usage error keeps click's message and exit code 2, on one line with a pointer to --help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        e.show()
        return e.exit_code
    hint = ""
    ctx = getattr(e, "ctx", None)
    if isinstance(e, _clickx.UsageError) and ctx is not None:
        hint = f" (see {ctx.command_path} --help)"
    print(f"error: {_one_line(e.format_message())}{hint}", file=sys.stderr)
    return e.exit_code


_ABORTS = tuple({typer.Abort, *(c for c in (getattr(_clickx, "Abort", None),) if c is not None)})


RESUMABLE = ("train", "star", "run")  # the commands that keep finished work and resume from it


def _interrupted(argv: list[str]) -> str:
    """The Ctrl-C line: the resume hint only where it is true."""
    command = next((a for a in argv if not a.startswith("-")), "")
    if command in RESUMABLE:
        return "interrupted; completed work is saved and a re-run resumes it"
    return f"interrupted; stardomain {command or ''} does not resume: re-run it to start over".replace("  ", " ")


def _run(argv: list[str]) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)
    except _clickx.ClickException as e:
        return _click_error(e)
    except _ABORTS:  # Ctrl-C as typer (Exit 130) or an older click (Abort) reports it
        rc = 130
    if rc == 130:
        print(_interrupted(argv), file=sys.stderr)
    return rc if isinstance(rc, int) else 0


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Each call runs in a fresh context, so --allow-factory never outlives it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG["on"] = os.environ.get("STARDOMAIN_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line, not only before the command
    threads = _torch_threads()
    try:
        rc = contextvars.copy_context().run(_run, argv)
    except KeyboardInterrupt:
        print(_interrupted(argv), file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if _DEBUG["on"]:
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__)
        msg = _user_message(e)
        if msg is not None:
            print(f"error: {_one_line(msg)}", file=sys.stderr)
            sys.exit(2)
        where = ""
        if not _DEBUG["on"]:
            try:
                where = f" (traceback written to {_write_traceback(e)}; rerun with --debug to print it)"
            except OSError:
                where = " (rerun with --debug to print the traceback)"
        print(f"internal error: {type(e).__name__}: {_one_line(e, 300)}{where}", file=sys.stderr)
        sys.exit(1)
    finally:  # --threads is per command: an in-process caller gets its own setting back
        if threads is not None:
            sys.modules["torch"].set_num_threads(threads)
    if rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
