"""The ``privdiff`` command: parses arguments, then calls the library. No logic lives here."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from importlib import resources
from pathlib import Path

from privdiff.runtime import keep_freed_memory

EPILOG = """examples:
  privdiff demo                                        DPDM warm-started on public glyphs, on the built-in MNIST digits, eps=10
  privdiff recipes                                     the shipped recipes, one line each
  privdiff train recipes/dpdm-mnist5k.yaml privacy.epsilon=1 --out runs/eps1
  privdiff train recipes/dpdm-mnist5k.yaml data.name=mnist data.root=~/data/mnist --out runs/mnist
  privdiff train dpdm-mnist5k --nproc 4 --out runs/w4   4 processes (torchrun, DistributedDataParallel), same epsilon
  privdiff sample runs/eps1 --n 64 --label 3 --out three.png
  privdiff train dpdm-mnist5k data.name=folder data.root=~/flowers data.holdout=0.1 --out runs/flowers
                                                       your class folders, at their own size (data.resolution=N resizes)
  privdiff sample runs/flowers --n 16 --label tulip    a class by its folder's name (or its index)
  privdiff train dp-ldm-mnist5k --out runs/ldm           DP-LDM: public autoencoder + latent model, private fine-tuning
  privdiff sample runs/ldm --n 20 --prompt "a handwritten digit seven" --out seven.png
  privdiff budget calibrate --epsilon 10 --delta 1e-5 --n 60000 --batch-size 4096 --epochs 300
  privdiff budget show runs/eps1
  privdiff budget init --registry /shared/reg.sqlite   create a budget registry (a given one that does not exist is refused)
  privdiff budget cap dpdm-mnist5k --epsilon 20        cap mnist5k across all runs (PRIVDIFF_REGISTRY=postgresql://... for teams)
  privdiff budget status --dataset mnist5k             every run on mnist5k, its epsilon, the composed total
  privdiff budget release runs/crashed                 free an abandoned run's reservation (executed steps stay spent)
  privdiff audit dpdm-mnist5k privacy.epsilon=2 --out runs/audit   empirical lower bound on epsilon (exit 1 if above the claim;
                                                       DPDM, DP-LDM, DPP: checked against the DP-SGD stage's own epsilon)
  privdiff evaluate runs/eps1 --n 2000                 FID/KID, precision/recall, accuracy -> metrics.json, report.html
  privdiff compare runs/demo runs/eps1 --out runs/compare
  privdiff train he-ldm-mnist5k --out runs/he          DP-LDM with the HE-friendly denoiser, then:
  privdiff he serve runs/he --port 8750                 encrypted inference server
  privdiff he generate --server http://127.0.0.1:8750 --prompt "a handwritten digit three" --out three.png
  privdiff he serve --pipeline ~/sd15                   HE-Diffusion (compat mode, PLMS) on a Stable-Diffusion pipeline;
                                                       then: privdiff he generate --mode compat --server ... --prompt ...
  privdiff train pretrained-unet-dp model.pretrained=~/ddpm data.root=~/images --out runs/ft   your UNet, DP fine-tuned
  privdiff export runs/ft --out ~/ddpm-dp              back to plain diffusers
  privdiff attack runs/eps1 --attack loss              membership inference -> RUN/attacks/loss.json, loss.png

key=value overrides may come before or after the options. An error is one line on stderr: exit 2 (a bad
argument, recipe, file or registry), 3 (an unforeseen failure; PRIVDIFF_TRACEBACK=1 shows its traceback).
"""


DEMO_RECIPE = "dpdm-glyphs-mnist5k"
"""The recipe ``privdiff demo`` trains: the winner of the public proxy search (benchmarks/proxy_search.py)."""


def shipped_recipes() -> dict[str, str]:
    """The recipes shipped with privdiff: name -> its one-line description (the first comment line of the file,
    with "..." where its sentence goes on)."""
    out = {}
    for path in sorted((resources.files("privdiff") / "recipes").iterdir(), key=lambda p: p.name.removesuffix(".yaml")):
        if not path.name.endswith(".yaml"):
            continue
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        first = next((ln.lstrip("#").strip() for ln in lines if ln.startswith("#")), "")
        out[path.name[: -len(".yaml")]] = first if not first or first.endswith((".", ")")) else first + " ..."
    return out


def _recipe_path(name: str) -> str:
    """A recipe file path, or the name of a recipe shipped with privdiff (e.g. ``dpdm-mnist5k``).

    Raises:
        FileNotFoundError: Neither: one line that suggests the closest shipped recipes (``privdiff recipes``).
    """
    if os.path.exists(name):
        return name
    shipped = resources.files("privdiff") / "recipes" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if shipped.is_file():
        return str(shipped)
    import difflib

    names = list(shipped_recipes())
    stem = Path(name).name.removesuffix(".yaml")
    close = difflib.get_close_matches(stem, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"shipped: {', '.join(names)}"
    raise FileNotFoundError(f"{name}: no such recipe file, nor a shipped recipe ({hint}; privdiff recipes lists them)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that adds an option's default only where it says something: never "(default: None)" or
    "(default: False)", and never a second default where the help text already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
            or "default" in text
            or "%(default)" in text
        ):
            return text
        return text + " (default: %(default)s)"


class _RawHelp(argparse.RawDescriptionHelpFormatter, _Help):
    """:class:`_Help` that keeps the top-level description and examples as written."""


def _quiet_prv_domain_warning() -> None:
    """Keep Opacus' PRV accountant from printing an RDP warning. To size its grid it takes an RDP bound at a
    tiny delta, whose "Optimal order is the largest alpha" hint concerns that internal bound, not the epsilon
    the PRV accountant reports, and no user can act on it. Dropped only when it comes from inside the PRV
    accountant (the RDP accountant's own warnings still show)."""
    import traceback
    import warnings

    show = warnings.showwarning
    if getattr(show, "_privdiff_prv", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if "Optimal order is the" in str(message) and any(
            "accountants/prv" in f.filename.replace(os.sep, "/")
            or "accountants/analysis/prv" in f.filename.replace(os.sep, "/")
            for f in traceback.extract_stack()
        ):
            return
        show(message, category, filename, lineno, file, line)

    showwarning._privdiff_prv = True
    warnings.showwarning = showwarning


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line of stderr (exit 2) instead of the usage block, and
    :class:`_Help` for every command's help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounded(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """An argparse ``type``: an int (or a finite float) in [lo, hi] (``lo_open``: > lo)."""

    def parse(raw: str):
        from .config import Bound, RecipeError

        try:
            value = kind(raw.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {raw!r}"
            ) from None
        try:
            Bound(lo=lo, hi=hi, lo_open=lo_open).check("", value)
        except RecipeError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None
        return value

    parse.__name__ = kind.__name__
    return parse


def _key(key: str):
    """An argparse ``type`` for a flag that sets recipe key ``key``: read and checked as ``key=value`` is
    (its type and its range in :data:`privdiff.config.RANGES`)."""

    def parse(raw: str):
        from .config import RecipeError, parse_value

        try:
            return parse_value(key, raw, name="")
        except RecipeError as e:
            raise argparse.ArgumentTypeError(str(e).lstrip(": ")) from None

    parse.__name__ = key
    return parse


SEED = _bounded(int, 0, 2**63 - 1)


def _class_label(raw: str) -> str:
    """An argparse ``type`` for ``sample --label``: a class name (any text) or an index >= 0; the run's classes
    decide which (:func:`privdiff.core.generation.class_index`), but a negative or huge index is refused now."""
    text = raw.strip()
    if not text:
        raise argparse.ArgumentTypeError("expected a class name or index, got an empty string")
    try:
        index = int(text)
    except ValueError:
        return text
    if not 0 <= index <= 2**31 - 1:
        raise argparse.ArgumentTypeError(f"a class index must be in [0, {2**31 - 1}], got {raw!r}")
    return text


MAX_SAMPLE = 100_000  # images one `privdiff sample` draws (they are held in memory, and make one grid)
MAX_NPROC = 1024


def _check_registry() -> None:
    """Open the budget registry the run will be admitted to, before anything is written: a location that
    was given but holds no registry (or cannot be reached) is an error now, not after the run started."""
    from .privacy.registry import Registry

    Registry().close()


def cmd_train(args: argparse.Namespace) -> int:
    from .config import resolve_recipe
    from .distributed import init_from_env, launched_by_torchrun, shutdown

    recipe = resolve_recipe(
        _recipe_path(args.recipe), args.overrides
    )  # a bad recipe fails here, before any worker starts
    out = args.out or os.path.join("runs", Path(args.recipe).stem)
    if not launched_by_torchrun() or int(os.environ.get("RANK", "0")) == 0:
        _check_registry()
    if args.nproc is not None and args.nproc > 1 and not launched_by_torchrun():
        return _launch_torchrun(args, out)
    from .method_registry import get_method

    world = init_from_env()  # under torchrun: join the process group (docs/distributed.md)
    options = {"grid_per_class": 0} if args.no_grid else {}
    result = get_method(recipe.method).train(recipe, out=out, progress=not args.quiet and world.is_main, **options)
    if world.is_main:
        _report(result)
    shutdown()
    return 0


def _launch_torchrun(args: argparse.Namespace, out: str) -> int:
    """``privdiff train ... --nproc W``: the same command as W workers on this machine, via torchrun."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = (
        [
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            "--module",
            "privdiff.cli",
            "train",
            args.recipe,
            *args.overrides,
            "--out",
            out,
        ]
        + (["--quiet"] if args.quiet else [])
        + (["--no-grid"] if args.no_grid else [])
    )
    try:
        torchrun.main(argv)
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        print(
            f"privdiff: error: {len(e.failures)} of {args.nproc} workers failed (exit {codes}); their messages are above",
            file=sys.stderr,
        )
        return next((c for c in codes if c > 0), 1)
    return 0


def _report(result) -> None:
    ledger = result.ledger.to_dict()
    eps = "inf (non-private)" if ledger["epsilon"] is None else f"{ledger['epsilon']:.4f}"
    ckpt = result.run.latest_checkpoint()
    print(f"run:        {result.run.path}")
    print(f"steps:      {result.steps}")
    print(f"epsilon:    {eps} at delta={ledger['delta']} ({ledger['accountant']})")
    print(f"ledger:     {result.run.ledger_path}")
    if result.run.load_config().model.pretrained:  # a user's diffusers model: back in its own layout by export
        print(f"checkpoint: {ckpt}  (privdiff's; privdiff export {result.run.path} --out DIR: plain diffusers)")
    else:  # the class diffusers saved: UNet2DModel in pixel space, UNet2DConditionModel for DP-LDM's latent net
        config = ckpt / "unet_ema" / "config.json"
        cls = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
        how = f"diffusers {cls}.from_pretrained" if cls else "privdiff's; privdiff sample RUN draws from it"
        print(f"checkpoint: {ckpt / 'unet_ema'}  ({how})")
    print(
        f"grid:       {result.grid if result.grid is not None else 'none (--no-grid): privdiff sample RUN draws one'}"
    )
    print(f"next:       privdiff evaluate {result.run.path}   (FID/KID, precision/recall, accuracy, report.html)")


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import resolve_recipe
    from .method_registry import get_method

    recipe = resolve_recipe(_recipe_path(DEMO_RECIPE), args.overrides)
    _check_registry()
    print(f"privdiff demo: {DEMO_RECIPE}: {shipped_recipes()[DEMO_RECIPE]}", file=sys.stderr)
    result = get_method(recipe.method).train(recipe, out=args.out, progress=True)
    _report(result)
    return 0


def _sample_output(out: str | None) -> str:
    """What ``sample --out`` writes, by its extension (any case): "png" (the grid), "npz" (the arrays), or
    "dir" (a directory of grid.png and samples.npz). Checked before anything is drawn."""
    if out is None:
        return "dir"
    kind = {".png": "png", ".npz": "npz"}.get(Path(out).suffix.lower(), "dir")
    path = Path(out)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} is a file: give a .png (the grid), a .npz (the arrays) or a directory")
    if kind != "dir" and path.is_dir():
        raise ValueError(f"--out {out} is a directory: a {path.suffix} output is a file")
    return kind


def cmd_recipes(args: argparse.Namespace) -> int:
    recipes = shipped_recipes()
    if args.show is not None:
        path = _recipe_path(args.show)
        print(Path(path).read_text(), end="")
        return 0
    width = max(len(n) for n in recipes)
    for name, text in recipes.items():
        print(f"{name.ljust(width)}  {text}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .config import recipe_to_dict, resolve_recipe
    from .core.denoisers import load_decoder, load_denoiser
    from .core.generation import generate, sample_labels
    from .runs import Run, save_grid, save_npz, save_samples

    kind = _sample_output(args.out)
    run = Run(args.run)
    overrides = [
        f"sampler.{k}={v}"
        for k, v in (("steps", args.steps), ("guidance", args.guidance), ("name", args.sampler))
        if v is not None
    ]
    if args.sampler is not None:  # privdiff's own sampler asked for: not the pipeline's scheduler
        overrides.append("sampler.scheduler=null")
    if args.scheduler is not None:
        overrides.append(f"sampler.scheduler={args.scheduler}")
    recipe = resolve_recipe(recipe_to_dict(run.load_config()), overrides)
    denoiser = load_denoiser(run, recipe)
    labels, nrow = sample_labels(
        n=args.n,
        num_classes=denoiser.net.num_classes,
        label=args.label,
        class_names=run.class_names(),
        text=args.prompt is not None,
    )
    n = args.n if labels is None else len(labels)
    prompts = None if args.prompt is None else [args.prompt]
    images = generate(
        denoiser,
        labels=labels,
        n=n,
        recipe=recipe,
        prompts=prompts,
        decode=load_decoder(run),
        seed=args.seed,
        progress=not args.quiet,
    )
    lab = None if labels is None else labels.numpy()
    if kind == "png":
        save_grid(args.out, images, nrow=nrow)
        if not args.quiet:
            print(args.out)
        return 0
    if kind == "npz":
        save_npz(args.out, images, lab)
        if not args.quiet:
            print(args.out)
        return 0
    out = Path(args.out) if args.out else run.samples
    grid, npz = save_samples(out, images, lab, nrow=nrow)
    print(f"{grid}\n{npz}")
    return 0


def cmd_budget_calibrate(args: argparse.Namespace) -> int:
    from .privacy.accounting import calibrate_noise, epsilon
    from .privacy.budget import steps_for

    if args.batch_size > args.n:
        raise ValueError(f"--batch-size must be in [1, --n], got {args.batch_size} for n={args.n}")
    q = args.batch_size / args.n
    steps = (
        args.steps
        if args.steps is not None
        else steps_for(epochs=args.epochs, num_examples=args.n, batch_size=args.batch_size)
    )
    sigma = calibrate_noise(
        epsilon_target=args.epsilon, delta=args.delta, sample_rate=q, steps=steps, accountant=args.accountant
    )
    eps = epsilon([(sigma, q, steps)], delta=args.delta, accountant=args.accountant)
    print(
        json.dumps(
            {
                "noise_multiplier": sigma,
                "sample_rate": q,
                "steps": steps,
                "epsilon": eps,
                "delta": args.delta,
                "accountant": args.accountant,
            },
            indent=2,
        )
    )
    return 0


def cmd_budget_show(args: argparse.Namespace) -> int:
    from .privacy.ledger import Ledger, format_ledger

    path = Path(args.run)
    path = path / "ledger.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ledger (is this a privdiff run directory?)")
    print(format_ledger(Ledger.load(path), accountant=args.accountant))
    return 0


def _registry(args: argparse.Namespace):
    from .privacy.registry import Registry

    return Registry(args.registry)


def cmd_budget_status(args: argparse.Namespace) -> int:
    from .privacy.registry import format_status

    statuses = _registry(args).status(args.dataset)
    if args.dataset and not statuses:
        raise ValueError(f"no data set named {args.dataset!r} in the registry")
    print(format_status(statuses))
    return 0


def cmd_budget_init(args: argparse.Namespace) -> int:
    from .privacy.registry import Registry

    registry = Registry(args.registry, create=True)
    if registry.created:
        print(
            f"created an empty budget registry at {registry.display} (no caps yet: privdiff budget cap RECIPE --epsilon E)"
        )
    else:
        n = len(registry.status())
        print(f"{registry.display} is already a budget registry ({n} data set{'s' * (n != 1)}): nothing changed")
    return 0


def cmd_budget_cap(args: argparse.Namespace) -> int:
    from .config import resolve_recipe
    from .core.stages import private_dataset
    from .privacy.budget import data_identity, registry_examples
    from .privacy.registry import format_status

    recipe = resolve_recipe(_recipe_path(args.recipe), args.overrides)
    registry = _registry(args)  # a registry that is not there is refused before the data is read
    dataset = private_dataset(recipe)
    key = registry.set_cap(
        dataset=data_identity(dataset),
        epsilon=None if args.remove else args.epsilon,
        delta=args.delta or recipe.privacy.delta,
        accountant=recipe.privacy.accountant,
        examples=registry_examples(registry, dataset),
    )
    print(format_status(registry.status(key)))
    return 0


def cmd_budget_name(args: argparse.Namespace) -> int:
    from .config import resolve_recipe
    from .core.stages import private_dataset
    from .privacy.budget import data_identity, registry_examples
    from .privacy.registry import format_status

    recipe = resolve_recipe(_recipe_path(args.recipe), args.overrides)
    registry = _registry(args)  # a registry that is not there is refused before the data is read
    dataset = private_dataset(recipe)
    key = registry.name_dataset(
        dataset=data_identity(dataset),
        name=args.name,
        examples=registry_examples(registry, dataset),
        delta=recipe.privacy.delta,
        accountant=recipe.privacy.accountant,
    )
    print(format_status(registry.status(key)))
    return 0


def cmd_budget_release(args: argparse.Namespace) -> int:
    from .privacy.registry import format_status
    from .privacy.budget import release_run

    registry = _registry(args)
    run_id, entry, freed = release_run(args.run, registry=registry, missing_ok=args.missing_ok)
    if not freed:
        print(f"run {run_id[:12]} holds no reservation ({entry.state}): nothing to release")
    else:
        kept = entry.epsilon()
        what = ", ".join(f"{e.steps} planned steps of {e.stage}" for e in freed)
        print(
            f"released run {run_id[:12]}: {what} no longer reserved; it keeps its {entry.steps} executed steps "
            f"(epsilon={'inf' if math.isinf(kept) else f'{kept:.4f}'})"
        )
    print(format_status([s for s in registry.status() if any(r.run_id == run_id for r in s.runs)]))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .config import resolve_recipe
    from .evaluation.audit import audit

    recipe = resolve_recipe(_recipe_path(args.recipe), args.overrides)
    k_in = args.canaries // 5 if args.k_in is None else args.k_in
    k_out = args.canaries // 5 if args.k_out is None else args.k_out
    if not 1 <= k_in + k_out <= args.canaries:
        raise ValueError(f"--k-in + --k-out must be in [1, --canaries={args.canaries}], got {k_in} + {k_out}")
    _check_registry()
    out = args.out or os.path.join("runs", Path(args.recipe).stem + "-audit")
    done = audit(recipe, out=out, canaries=args.canaries, k_in=args.k_in, k_out=args.k_out, progress=not args.quiet)
    r = done.result
    print(f"run:             {done.run.path}")
    print(f"claimed epsilon: {r.claimed_epsilon:.4f} at delta={r.delta:g} (the ledger's, all stages composed)")
    print(
        f"audited stage:   {r.stage}, epsilon {r.stage_epsilon:.4f} (its events alone, {r.steps} steps: the canaries' stage)"
    )
    print(
        f"audited bound:   epsilon >= {r.epsilon_lower_bound:.4f} at {r.confidence:.0%} confidence "
        f"({r.correct} of {r.guesses_in + r.guesses_out} guesses right)"
    )
    print(f"canaries:        {r.canaries} ({r.included} included by coin flips)")
    print(f"attack:          {r.attack}")
    print(f"audit:           {done.path}")
    if not r.passed:
        print(
            f"privdiff: AUDIT FAILED: the audited lower bound {r.epsilon_lower_bound:.4f} exceeds the {r.stage} stage's "
            f"epsilon {r.stage_epsilon:.4f} (run total {r.claimed_epsilon:.4f}): the run is not as private as its ledger says",
            file=sys.stderr,
        )
        return 1
    print(f"passed:          the experiment is consistent with the {r.stage} stage's epsilon")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.evaluate import evaluate_run, format_metrics

    result = evaluate_run(
        args.run,
        n=args.n,
        seed=args.seed,
        overrides=args.overrides,
        inception_weights=args.inception_weights,
        progress=not args.quiet,
        report=not args.no_report,
    )
    print(format_metrics(result))
    print(f"metrics:    {Path(args.run) / 'metrics.json'}")
    if not args.no_report:
        print(f"report:     {Path(args.run) / 'report.html'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .core.export import export_run

    print(export_run(args.run, out=args.out))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import compare_runs, stale_metrics, text_table

    rows, written = compare_runs(args.runs, out=args.out)
    for run in args.runs:
        warning = stale_metrics(run)
        if warning:
            print(f"privdiff: warning: {warning}", file=sys.stderr)
    print(text_table(rows))
    for path in written.values():
        print(path)
    return 0


def cmd_he_serve(args: argparse.Namespace) -> int:
    import torch

    from .he.server import ServiceConfig, serve

    if args.pipeline is None:  # a run's work is CKKS (TenSEAL); torch's thread pool only contends with it
        torch.set_num_threads(1)  # (a pipeline's UNet is the server's real work: it keeps torch's threads)

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: a free port), got {args.port}")
    serve(
        args.run,
        pipeline=args.pipeline,
        host=args.host,
        port=args.port,
        config=ServiceConfig(
            max_body_mb=args.max_body_mb,
            timeout_s=args.timeout,
            max_sessions=args.max_sessions,
            workers=args.workers,
            max_client_sessions=args.max_client_sessions,
            max_client_jobs=args.max_client_jobs,
            session_ttl_s=args.session_ttl,
        ),
    )
    return 0


def cmd_he_generate(args: argparse.Namespace) -> int:
    import torch

    from .he.client import ServiceError, generate

    torch.set_num_threads(1)  # the client's torch work is tiny (norms, softmax); a thread pool only adds contention

    try:
        result = generate(
            args.server,
            args.prompt,
            mode=args.mode,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            params=args.params,
            progress=not args.quiet,
            timeout=args.timeout,
        )
    except ServiceError as e:
        raise OSError(str(e)) from None
    result.save(args.out)
    per = sum(result.per_eval) / max(1, len(result.per_eval))
    print(
        f"{args.out}: {result.mode} mode, {result.evaluations} denoiser evaluations in {result.seconds:.1f} s "
        f"({per:.2f} s each), {result.rounds} round trips, {result.bytes_up / 1e6:.1f} MB sent, {result.bytes_down / 1e6:.1f} MB received"
    )
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .attacks import ATTACKS, run_attacks

    names = list(ATTACKS) if args.attack == "all" else [args.attack]
    results = run_attacks(
        args.run,
        names,
        n_per_role=args.n_per_role,
        seed=args.seed,
        unused_nonmembers=args.unused_nonmembers,
        progress=not args.quiet,
    )
    for name, r in results.items():
        tpr = lambda v: "n/a (not resolvable)" if v is None else f"{v:.3f}"  # noqa: E731
        print(
            f"{name:<6} AUC {r['auc']:.3f}  ASR {r['asr']:.3f}  TPR@1%FPR {tpr(r['tpr_at_1pct_fpr'])}  "
            f"TPR@0.1%FPR {tpr(r['tpr_at_0.1pct_fpr'])}  ({r['n_members']} members, {r['n_nonmembers']} non-members)  "
            f"-> {Path(args.run) / 'attacks' / (name + '.json')}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="privdiff",
        description="Privacy-preserving diffusion models: train with DP-SGD, sample, account.",
        epilog=EPILOG,
        formatter_class=_RawHelp,
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"privdiff {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help=f"train the demo recipe ({DEMO_RECIPE}: DPDM warm-started on public glyphs, then DP-SGD on the built-in MNIST digits at eps=10) and sample a class grid",
    )
    d.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (dotted paths)")
    d.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo; reruns resume it)")
    d.set_defaults(func=cmd_demo)

    rc = sub.add_parser(
        "recipes",
        help="list the recipes shipped with privdiff and what each one is",
        description="The recipes shipped with privdiff, by the name privdiff train / audit / budget cap accept, "
        "each with the first line of its comment. Copy one (privdiff recipes --show NAME > mine.yaml) to adapt it.",
    )
    rc.add_argument("--show", metavar="NAME", help="print this recipe's file instead of the list")
    rc.set_defaults(func=cmd_recipes)

    t = sub.add_parser("train", help="train from a recipe; resumes RUN if --out already holds it")
    t.add_argument("recipe", help="recipe YAML (or a shipped recipe name, e.g. dpdm-mnist5k)")
    t.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides, e.g. privacy.epsilon=1 train.batch_size=512",
    )
    t.add_argument("--out", help="run directory (default: runs/<recipe name>)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument(
        "--no-grid",
        action="store_true",
        help="skip the class grid drawn at the end of training (privdiff sample RUN draws one later)",
    )
    t.add_argument(
        "--nproc",
        type=_bounded(int, 1, MAX_NPROC),
        metavar="W",
        help="train with W processes on this machine (torchrun; one per GPU, or CPU cores split among them); "
        "epsilon does not depend on W. Several machines: docs/distributed.md",
    )
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw images from a trained run")
    s.add_argument("run", help="run directory")
    s.add_argument(
        "--n",
        type=_bounded(int, 1, MAX_SAMPLE),
        default=100,
        help="number of images (a class grid rounds down to a multiple of the classes; "
        "fewer than the classes: one each of the first N)",
    )
    s.add_argument(
        "--label",
        type=_class_label,
        help="one class for all images: its name (an image folder's sub-folder, e.g. flower) or its index",
    )
    s.add_argument("--prompt", help='a text prompt for all images, e.g. "a handwritten digit seven" (DP-LDM runs)')
    s.add_argument("--steps", type=_key("sampler.steps"), help="sampler steps (default: the recipe's)")
    how = s.add_mutually_exclusive_group()
    how.add_argument(
        "--sampler", choices=["heun", "edm", "euler", "ddim"], help="privdiff's sampler (default: the recipe's)"
    )
    how.add_argument(
        "--scheduler",
        help="a pretrained pipeline's own diffusers scheduler on its timesteps: pipeline (the one it was saved with), "
        "ddim, pndm/plms, euler, euler-ancestral, dpm-solver, ddpm (dp-finetune runs)",
    )
    s.add_argument("--guidance", type=_key("sampler.guidance"), help="classifier-free guidance scale w")
    s.add_argument("--seed", type=SEED, default=0, help="seed of the samples")
    s.add_argument(
        "--out",
        help="by its extension (any case): .png the grid, .npz the arrays (images, labels); "
        "anything else a directory for grid.png + samples.npz (default: RUN/samples)",
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar, and print nothing but the output paths")
    s.set_defaults(func=cmd_sample)

    ev = sub.add_parser(
        "evaluate",
        help="FID/KID, precision/recall and downstream accuracy of a run, with a report",
        description="Draw samples from RUN's EMA checkpoint; write RUN/metrics.json (each metric beside its "
        "real-data floor or ceiling) and RUN/report.html. The private test split is read once, last.",
    )
    ev.add_argument("run", help="run directory")
    ev.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="evaluate.* / sampler.* overrides, e.g. evaluate.classifier_epochs=50",
    )
    ev.add_argument(
        "--n",
        type=_key("evaluate.n_samples"),
        help="number of samples (default: the recipe's evaluate.n_samples, 10000)",
    )
    ev.add_argument("--seed", type=SEED, default=0, help="seed of the samples and the metrics' subsets (default: 0)")
    ev.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="use the FID Inception-v3 from this local file (weights-inception-2015-12-05-6726825d.pth) "
        "instead of privdiff's feature CNN; nothing is downloaded",
    )
    ev.add_argument("--no-report", action="store_true", help="skip RUN/report.html")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=cmd_evaluate)

    ex = sub.add_parser(
        "export",
        help="a run that fine-tuned your diffusers model, back in plain diffusers (pipeline or UNet directory)",
        description="Write RUN's EMA UNet in the layout model.pretrained came in: a pipeline directory "
        "(DiffusionPipeline.from_pretrained) or a UNet directory with its scheduler config (UNet2DModel.from_pretrained). "
        "OUT must not exist; it is written complete or not at all.",
    )
    ex.add_argument("run", help="run directory (method dp-finetune)")
    ex.add_argument("--out", required=True, help="a new directory")
    ex.set_defaults(func=cmd_export)

    cp = sub.add_parser(
        "compare", help="one table of several evaluated runs (method, epsilon, FID, KID, accuracy, time)"
    )
    cp.add_argument("runs", nargs="+", metavar="RUN", help="evaluated run directories (privdiff evaluate RUN)")
    cp.add_argument("--out", help="also write OUT.csv and OUT.md")
    cp.set_defaults(func=cmd_compare)

    he = sub.add_parser("he", help="encrypted inference (CKKS): serve a run, or generate from a server")
    hsub = he.add_subparsers(dest="he_command", required=True, metavar="ACTION")
    hs = hsub.add_parser(
        "serve",
        help="serve a run trained with ldm.net=he (e.g. recipe he-ldm-mnist5k), or a Stable-Diffusion pipeline "
        "(--pipeline DIR, compat mode), over HTTP",
    )
    hs.add_argument("run", nargs="?", help="run directory (or --pipeline)")
    hs.add_argument(
        "--pipeline",
        metavar="DIR",
        help="a local Stable-Diffusion-style diffusers pipeline directory: HE-Diffusion's compat mode with PLMS",
    )
    hs.add_argument("--host", default="127.0.0.1", help="address to listen on")
    hs.add_argument("--port", type=_bounded(int, 0, 65535), default=8750, help="port to listen on (0: a free one)")
    hs.add_argument(
        "--max-body-mb",
        type=_bounded(float, 0, 1e6, lo_open=True),
        default=64.0,
        help="larger requests are refused (413)",
    )
    hs.add_argument(
        "--timeout",
        type=_bounded(float, 0, 1e6, lo_open=True),
        default=120.0,
        help="seconds one request may compute (then 503)",
    )
    hs.add_argument(
        "--max-sessions",
        type=_bounded(int, 1, 1_000_000),
        default=16,
        help="open sessions per mode (a full table refuses new ones: 503)",
    )
    hs.add_argument(
        "--max-client-sessions",
        type=_bounded(int, 1, 1_000_000),
        default=4,
        help="open sessions per mode and remote address (then 429)",
    )
    hs.add_argument(
        "--workers",
        type=_bounded(int, 1, 1024),
        default=2,
        help="threads doing HE work (a fair queue serves them to clients in turn)",
    )
    hs.add_argument(
        "--max-client-jobs",
        type=_bounded(int, 1, 1024),
        help="running requests per remote address (default: --workers)",
    )
    hs.add_argument(
        "--session-ttl",
        type=_bounded(float, 0, 1e7, lo_open=True),
        default=600.0,
        help="seconds after which an idle session is dropped",
    )
    hs.set_defaults(func=cmd_he_serve)
    hg = hsub.add_parser(
        "generate", help="one image for a prompt from a server; the secret key never leaves this machine"
    )
    hg.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8750")
    hg.add_argument("--prompt", required=True, help='the text prompt, e.g. "a handwritten digit three"')
    hg.add_argument("--out", required=True, help="a .png file")
    hg.add_argument(
        "--mode",
        choices=["private", "compat"],
        default="private",
        help="private: the server sees neither prompt nor image; compat: HE-Diffusion as published (the server sees both)",
    )
    hg.add_argument("--steps", type=_key("sampler.steps"), help="sampler steps (default: the server's recipe)")
    hg.add_argument(
        "--guidance",
        type=_key("sampler.guidance"),
        help="classifier-free guidance scale (default: the server's recipe)",
    )
    hg.add_argument("--seed", type=SEED, default=0, help="seed of the image")
    hg.add_argument(
        "--params",
        choices=["precise", "reference"],
        default="precise",
        help="CKKS parameters (reference: HE-Diffusion's, compat only)",
    )
    hg.add_argument(
        "--timeout",
        type=_bounded(float, 0, 1e6, lo_open=True),
        default=300.0,
        help="seconds to wait for each server reply",
    )
    hg.add_argument("--quiet", action="store_true", help="no progress bar")
    hg.set_defaults(func=cmd_he_generate)

    au = sub.add_parser(
        "audit",
        help="empirical privacy audit: train once with canaries, bound epsilon from below",
        description="Train the recipe once with m gradient canaries (each included by a fair coin) and turn "
        "the white-box attack's guesses into a lower bound on epsilon at 95% confidence "
        "(Steinke, Nasr & Jagielski 2023). The canaries live in the DP-SGD stage, so the bound "
        "is checked against that stage's own epsilon (printed with the run's composed total). "
        "Exit 1 if the bound exceeds it.",
    )
    au.add_argument("recipe", help="a DPDM, DP-LDM or DPP recipe (file or shipped name)")
    au.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    au.add_argument("--canaries", type=_bounded(int, 1, 10_000_000), default=1000, help="m, the number of canaries")
    au.add_argument("--k-in", type=_bounded(int, 0, 10_000_000), help="guesses IN (highest scores); default m/5")
    au.add_argument("--k-out", type=_bounded(int, 0, 10_000_000), help="guesses OUT (lowest scores); default m/5")
    au.add_argument("--out", help="run directory, must be fresh (default: runs/<recipe name>-audit)")
    au.add_argument("--quiet", action="store_true", help="no progress bars")
    au.set_defaults(func=cmd_audit)

    from .attacks import ATTACKS

    at = sub.add_parser(
        "attack",
        help="membership-inference attack on a run -> RUN/attacks/NAME.json and NAME.png",
        description="Score held-out members against held-out non-members of RUN (RUN/splits.json; for a run "
        "trained on its whole training split: members = that split, non-members = the test split). "
        "Attacks: " + "; ".join(f"{k}: {v}" for k, v in ATTACKS.items()),
    )
    at.add_argument("run", help="run directory")
    at.add_argument("--attack", required=True, choices=[*ATTACKS, "all"], help="which attack (all: one after another)")
    at.add_argument(
        "--n-per-role",
        type=_bounded(int, 1, 2**31 - 1),
        help="examples per split role when the splits are drawn now (default: balanced maximum)",
    )
    at.add_argument("--seed", type=SEED, default=0, help="seed of the attack's noise draws (default: 0)")
    at.add_argument(
        "--unused-nonmembers",
        type=_bounded(int, 0, 2**31 - 1),
        default=0,
        metavar="N",
        help="also score up to N non-member-split examples in no role (never trained on, never seen by a proxy; "
        "a fixed random subset), so TPR at 1%% / 0.1%% FPR can be measured; members stay member_test",
    )
    at.add_argument("--quiet", action="store_true", help="no progress bars")
    at.set_defaults(func=cmd_attack)

    b = sub.add_parser("budget", help="noise calibration, or the ledger of a run")
    bsub = b.add_subparsers(dest="budget_command", required=True, metavar="ACTION")
    c = bsub.add_parser("calibrate", help="noise multiplier for a target (epsilon, delta)")
    c.add_argument("--epsilon", type=_key("privacy.epsilon"), required=True, help="target epsilon (finite, > 0)")
    c.add_argument("--delta", type=_key("privacy.delta"), required=True, help="target delta, in (0, 1)")
    c.add_argument("--n", type=_bounded(int, 1, 10**12), required=True, help="number of private examples N")
    c.add_argument(
        "--batch-size", type=_bounded(int, 1, 10**12), required=True, help="expected batch size (q = batch/N, Poisson)"
    )
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--epochs", type=_key("train.epochs"), help="expected epochs (steps = epochs / q)")
    g.add_argument("--steps", type=_bounded(int, 1, 10**12), help="number of steps (instead of --epochs)")
    c.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="privacy accountant")
    c.set_defaults(func=cmd_budget_calibrate)
    sh = bsub.add_parser("show", help="print the ledger of a run and the epsilon it composes to")
    sh.add_argument("run", help="run directory or ledger.json")
    sh.add_argument("--accountant", choices=["rdp", "prv"], help="also recompute epsilon with this accountant")
    sh.set_defaults(func=cmd_budget_show)
    registry_help = (
        "budget registry: a SQLite file or postgresql://... that exists (privdiff budget init creates one) "
        "(default: $PRIVDIFF_REGISTRY, else ~/.privdiff/registry.sqlite, created on first use)"
    )
    ini = bsub.add_parser(
        "init",
        help="create a budget registry (a location that holds none is refused everywhere else)",
        description="Create an empty budget registry at --registry (or $PRIVDIFF_REGISTRY): a SQLite file "
        "(its directory is made) or the tables in a PostgreSQL database. Every other command "
        "refuses a given location that holds no registry, so a misspelt one is an error, not a "
        "fresh registry without caps. Nothing changes if it is a registry already.",
    )
    ini.add_argument("--registry", help="where (default: $PRIVDIFF_REGISTRY, else ~/.privdiff/registry.sqlite)")
    ini.set_defaults(func=cmd_budget_init)
    st = bsub.add_parser("status", help="every run registered on each data set, its epsilon, and the composed total")
    st.add_argument(
        "--dataset", help="only this data set (its name, e.g. mnist5k, or the name given with privdiff budget name)"
    )
    st.add_argument("--registry", help=registry_help)
    st.set_defaults(func=cmd_budget_status)
    cap = bsub.add_parser("cap", help="cap the composed epsilon of a recipe's private data set across all runs")
    cap.add_argument("recipe", help="recipe whose data.* names the data set (e.g. dpdm-mnist5k)")
    cap.add_argument(
        "overrides", nargs="*", metavar="key=value", help="data.* overrides, e.g. data.name=mnist data.root=~/data"
    )
    g = cap.add_mutually_exclusive_group(required=True)
    g.add_argument("--epsilon", type=_key("privacy.epsilon"), help="the cap (finite, > 0)")
    g.add_argument("--remove", action="store_true", help="remove the cap")
    cap.add_argument(
        "--delta",
        type=_key("privacy.delta"),
        help="delta at which the cap holds, in (0, 1) (default: the recipe's privacy.delta)",
    )
    cap.add_argument("--registry", help=registry_help)
    cap.set_defaults(func=cmd_budget_cap)
    nm = bsub.add_parser(
        "name",
        help="give a recipe's private data set a name that budget status shows",
        description="Name the data set a recipe trains on, as the budget registry knows it: the same images in "
        "any file format, and every data set they share examples with, are one data set. Its examples are "
        "registered on the way (how a data set of an older registry learns them).",
    )
    nm.add_argument("recipe", help="recipe whose data.* names the data set (e.g. dpdm-mnist5k)")
    nm.add_argument("name", help="the name (one that no other data set of the registry has)")
    nm.add_argument(
        "overrides", nargs="*", metavar="key=value", help="data.* overrides, e.g. data.name=folder data.root=~/pics"
    )
    nm.add_argument("--registry", help=registry_help)
    nm.set_defaults(func=cmd_budget_name)
    rel = bsub.add_parser(
        "release",
        help="free the reservation of a run abandoned after a crash (its executed steps stay spent)",
        description="An unfinished run keeps its planned budget reserved so that it can be resumed. For a run "
        "that will never be resumed, its charge becomes exactly what its ledger and the registry say "
        "it executed. Refused for a run that is running (its lock is held) or unknown. Resuming the "
        "run later reserves its plan again.",
    )
    rel.add_argument(
        "run",
        metavar="RUN_ID_OR_PATH",
        help="run directory, its ledger.json, or a run id (or the prefix budget status shows)",
    )
    rel.add_argument("--registry", help=registry_help)
    rel.add_argument(
        "--missing-ok",
        action="store_true",
        help="release a run id whose directory is gone from this machine (its lock cannot be checked)",
    )
    rel.set_defaults(func=cmd_budget_release)
    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a command's list of ``key=value`` overrides (or ``compare``'s runs) may come before,
    between or after its options (argparse alone stops collecting a positional list at the first option)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        dest = "overrides" if hasattr(args, "overrides") else "runs" if args.command == "compare" else None
        bad = [a for a in extra if dest is None or a.startswith("-") or (dest == "overrides" and "=" not in a)]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        setattr(args, dest, list(getattr(args, dest) or []) + extra)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    _quiet_prv_domain_warning()
    if args.command != "he":  # not the HE server: it must give memory back (privdiff.he.protocol.server_allocator)
        keep_freed_memory()  # no page faults on every step's buffers (privdiff.runtime)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("privdiff: interrupted (the run can be resumed with the same command)", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"privdiff: error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  a bug or an unforeseen failure: one line; PRIVDIFF_TRACEBACK=1 shows where
        if os.environ.get("PRIVDIFF_TRACEBACK"):
            raise
        msg = (str(e).splitlines() or [""])[0]
        print(
            f"privdiff: internal error: {type(e).__name__}{': ' + msg if msg else ''} "
            "(PRIVDIFF_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
