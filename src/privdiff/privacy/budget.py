"""What a run charges to the privacy budget: its ledger, opened and admitted to the registry before
any private data is read, the events its stages will record, their noise calibration, the guard that
every private step passes (check, write-ahead record, verify), and the steps a resumed run must not
count twice.

The training loop (:func:`privdiff.core.training.train_denoiser`) calls :func:`noise_for` and one
:class:`StepGuard` per stage; every method opens its ledger with :func:`open_ledger`; evaluation and
attacks read it with :func:`load_ledger`; ``privdiff budget release`` is :func:`release_run`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..config import Recipe, TrainConfig
from ..data import ImageDataset
from ..distributed import broadcast_object, current_world
from ..runs import Run, RunError, held_lock
from .accounting import calibrate_noise
from .events import NON_PRIVATE, SUBSAMPLED_GAUSSIAN, Release
from .ledger import Ledger
from .registry import Registry

__all__ = [
    "StepGuard",
    "check_plan",
    "data_identity",
    "load_ledger",
    "noise_for",
    "open_ledger",
    "planned_event",
    "planned_steps",
    "registry_examples",
    "release_run",
    "replayed_steps",
    "steps_for",
]


def steps_for(*, epochs: float, num_examples: int, batch_size: int) -> int:
    """Steps of ``epochs`` passes at expected batch ``batch_size`` over N examples: ``epochs / q``, q = batch_size / N (at least 1)."""
    return max(1, round(epochs * num_examples / batch_size))


def planned_steps(train: TrainConfig, num_examples: int) -> int:
    """Steps of a stage (the private one: the steps the noise is calibrated for): :func:`steps_for` its epochs and batch."""
    return steps_for(epochs=train.epochs, num_examples=num_examples, batch_size=train.batch_size)


def load_ledger(run: Run, dataset: ImageDataset) -> Ledger | None:
    """The run's ledger, if any, checked against the private data it must describe."""
    if not run.ledger_path.exists():
        return None
    try:
        ledger = Ledger.load(run.ledger_path)
    except (OSError, ValueError) as e:  # damaged: never replaced by a fresh one, which would restart the count
        raise RunError(
            f"{(str(e).splitlines() or [type(e).__name__])[0]}; the ledger is the run's privacy record: "
            "restore it from a backup (the run cannot continue without it)"
        ) from None
    if ledger.dataset.get("fingerprint") != dataset.fingerprint:
        raise RunError(
            f"{run.ledger_path}: recorded for data {ledger.dataset.get('fingerprint')}, "
            f"but {dataset.name} now has {dataset.fingerprint}"
        )
    return ledger


def open_ledger(
    run: Run,
    recipe: Recipe,
    dataset: ImageDataset,
    *,
    plan: list[Release] = (),
    stage: str = "dp_sgd",
    registry: Registry | None = None,
    also_touched: ImageDataset | None = None,
) -> Ledger:
    """The run's ledger (continued on resume), or a new one for ``dataset``, admitted to the budget registry.

    ``also_touched``: private examples outside ``dataset`` that the run reads without DP and that shape what it
    releases (PrivateLoRA's proxy attacker trains on non-members). The ledger names them (``dataset.also_touched``)
    and the registry admits the run with their examples too, so a later run on them composes with this one.

    Before any data is read, the run's planned events (``plan``: releases of earlier stages, e.g.
    DPP's; then the training stage ``stage`` the recipe calibrates, named as :func:`train_denoiser`
    will record it, so the registry matches the reservation to the recorded steps) are reserved in the registry (default:
    ``$PRIVDIFF_REGISTRY`` or ``~/.privdiff/registry.sqlite``), which refuses the run if the data
    set's composed ε would pass its cap; every later ledger save records the run's events there
    first (:mod:`privdiff.privacy.registry`). The run's examples are keyed with the registry's example
    key and admitted with it, so runs on the same images in another file format, or on a subset or
    superset of them, count against the same cap; the ledger records only a keyed digest of the set.

    Under ``torchrun`` rank 0 alone opens, admits and records the ledger; the other ranks hold a copy
    under rank 0's run id with no registry (one run in the registry whatever W), or raise rank 0's refusal.
    """
    world = current_world()
    if not world.distributed:
        return _open_ledger(run, recipe, dataset, plan=plan, stage=stage, registry=registry, also_touched=also_touched)
    ledger, refusal = None, None
    if world.is_main:
        try:
            ledger = _open_ledger(
                run, recipe, dataset, plan=plan, stage=stage, registry=registry, also_touched=also_touched
            )
        except Exception as e:  # every rank must hear the outcome, or the others would wait for rank 0 forever
            refusal = e
    mine = (
        (None, f"{type(refusal).__name__}: {refusal}")
        if refusal is not None
        else (ledger.run_id if ledger else None, None)
    )
    outcome = broadcast_object(mine)  # rank 0's (run id, error)
    if refusal is not None:
        raise refusal
    if outcome[1] is not None:
        raise RunError(f"rank 0 could not open the ledger ({outcome[1]})")
    if world.is_main:
        return ledger
    copy_ = load_ledger(run, dataset) or Ledger(
        delta=recipe.privacy.delta,
        accountant=recipe.privacy.accountant,
        dataset=data_identity(dataset),
        target_epsilon=recipe.privacy.epsilon if recipe.privacy.enabled else None,
    )
    copy_.run_id = outcome[0]  # its saves write nothing (rank 0 writes) and reach no registry (no sink)
    return copy_


def _open_ledger(
    run: Run,
    recipe: Recipe,
    dataset: ImageDataset,
    *,
    plan: list[Release],
    stage: str,
    registry: Registry | None,
    also_touched: ImageDataset | None = None,
) -> Ledger:
    ledger = load_ledger(run, dataset)
    fresh = ledger is None
    planned = list(plan) + [
        planned_event(
            recipe, ledger or _fresh_ledger(recipe, dataset), num_examples=len(dataset), stage=stage, prior=plan
        )
    ]  # calibrated before anything is written
    registry = registry or Registry()
    examples = registry_examples(registry, dataset)  # keyed here, on the data holder's machine
    if also_touched is not None:
        extra = registry_examples(registry, also_touched)
        if examples is None or extra is None:
            raise ValueError(
                f"{also_touched.name}: the run also reads these examples without DP, and they have no per-example "
                "identity for the budget registry; use data whose examples are known (a folder, a built-in set)"
            )
        examples = examples + extra
    if fresh:
        ledger = _fresh_ledger(recipe, dataset)
        if also_touched is not None:
            ledger.dataset["also_touched"] = data_identity(also_touched)
        if examples is not None:  # a keyed digest of the set: never the per-example hashes
            ledger.dataset["examples"] = registry.examples_digest(examples)
        run.created(run.ledger_path)  # a start that fails leaves no ledger behind
        ledger.save(run.ledger_path)  # its run_id is the registry's key: on disk before it is registered
    try:
        registry.admit(
            run_id=ledger.run_id,
            dataset=ledger.dataset,
            planned=planned,
            recorded=ledger.events,
            path=str(run.path.resolve()),
            target_epsilon=ledger.target_epsilon,
            delta=ledger.delta,
            accountant=ledger.accountant,
            examples=examples,
        )
    except BaseException:
        if fresh:
            run.ledger_path.unlink(missing_ok=True)  # a refused run leaves no ledger behind
        raise
    if fresh:  # a start that fails after this withdraws the reservation (it recorded nothing)
        run.on_undo(lambda: registry.withdraw(run_id=ledger.run_id))
    ledger.sink = lambda lg: registry.record(run_id=lg.run_id, events=lg.events)
    return ledger


def _fresh_ledger(recipe: Recipe, dataset: ImageDataset) -> Ledger:
    return Ledger(
        delta=recipe.privacy.delta,
        accountant=recipe.privacy.accountant,
        dataset=data_identity(dataset),
        target_epsilon=recipe.privacy.epsilon if recipe.privacy.enabled else None,
    )


def check_plan(
    out, recipe: Recipe, dataset: ImageDataset, *, plan: list[Release] = (), stage: str = "dp_sgd"
) -> list[Release]:
    """Before a run writes anything: the events :func:`open_ledger` will reserve, with the noise calibrated
    now (an unreachable target is an error here), against the run's ledger if ``out`` holds one (it must
    load and describe ``dataset``: a damaged ledger is an error before anything is touched)."""
    run = Run(out)
    ledger = load_ledger(run, dataset) if run.path.is_dir() else None
    return list(plan) + [
        planned_event(
            recipe, ledger or _fresh_ledger(recipe, dataset), num_examples=len(dataset), stage=stage, prior=plan
        )
    ]


def planned_event(
    recipe: Recipe, ledger: Ledger, *, num_examples: int, stage: str = "dp_sgd", prior: list[Release] = ()
) -> Release:
    """The event a recipe's private training stage will record: σ calibrated after the ledger's other
    stages and the ``prior`` planned ones (as :func:`noise_for` will), q, and its steps (``max_steps`` if fewer)."""
    t = recipe.train
    if not 1 <= t.batch_size <= num_examples:
        raise ValueError(
            f"train.batch_size={t.batch_size} must be in [1, {num_examples}], the size of the private data set"
        )
    steps = planned_steps(t, num_examples) if t.max_steps is None else min(planned_steps(t, num_examples), t.max_steps)
    q = t.batch_size / num_examples
    sigma = 0.0
    if recipe.privacy.enabled:
        recorded = {e.stage for e in ledger.events}
        others = ledger.history(exclude_stage=stage) + [e.triple for e in prior if e.stage not in recorded]
        sigma = _calibrate(
            recipe.privacy.epsilon,
            recipe.privacy.delta,
            q,
            planned_steps(t, num_examples),
            recipe.privacy.accountant,
            tuple(tuple(x) for x in others),
        )
    return Release(
        stage=stage,
        mechanism=SUBSAMPLED_GAUSSIAN if recipe.privacy.enabled else NON_PRIVATE,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
    )


def noise_for(recipe: Recipe, ledger: Ledger, *, stage: str, num_examples: int) -> float:
    """σ calibrated so that everything in the ledger *before* ``stage`` plus this stage meets the target.

    Deterministic in (recipe, earlier stages), so a resumed run recomputes the same σ.
    """
    prior = ledger.history(exclude_stage=stage)
    return _calibrate(
        recipe.privacy.epsilon,
        recipe.privacy.delta,
        recipe.train.batch_size / num_examples,
        planned_steps(recipe.train, num_examples),
        recipe.privacy.accountant,
        tuple(tuple(x) for x in prior),
    )


@functools.lru_cache(maxsize=64)
def _calibrate(
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior: tuple[tuple[float, float, int], ...],
) -> float:
    """:func:`calibrate_noise`, once per process for the same arguments (a start checks the plan, reserves it
    and then trains with it: three calls, one search). Deterministic, so the cache changes no value."""
    return calibrate_noise(
        epsilon_target=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        prior=list(prior),
    )


def replayed_steps(ledger: Ledger | None, *, stage: str, start: int, mech: Release, offset: int = 0) -> int:
    """The step index up to which the ledger has counted ``stage`` (write-ahead): ``start`` plus the steps a
    killed attempt counted after its last checkpoint, which a resumed run replays from the checkpoint.

    ``offset`` is how many more steps the ledger counts than the step index, for steps that were
    taken again with fresh draws after a damaged checkpoint (saved in every later checkpoint), so
    that those are never mistaken for replays of steps that never ran.

    Why a replayed step is not counted again: ε bounds the distribution of what is released (the
    checkpoints and the final model). The checkpoint holds the generators of the Poisson sampler and
    of the Gaussian noise, so a replayed step t draws the same batch B_t and the same noise z_t as
    the killed attempt did, and the killed attempt's update never left its process (it wrote no
    checkpoint; its log lines are rewound). The released model therefore has exactly the
    distribution of an uninterrupted run of the same seed, whose ledger counts each step once.
    Counting replays would make ε depend on when the machine died, not on what was released.
    A killed attempt can have counted one step it never ran (killed between the ledger write and
    the step): that step is executed by the replay, so the count is exact once the run completes.
    """
    if ledger is None:
        return start
    counted = ledger.steps(stage) - offset
    if counted < start:  # a checkpoint is written after its steps were counted: never fewer
        raise RunError(
            f"the ledger counts {counted} steps of {stage}, but its checkpoint is at step {start}: "
            "the ledger is not this run's (or was edited)"
        )
    if counted > start:
        last = next(e for e in reversed(ledger.events) if e.stage == stage)
        if not last.same_mechanism(mech):
            raise RunError(
                f"resuming {stage}: the mechanism differs from the one counted before the crash "
                f"({last.with_steps(1)} vs {mech.with_steps(1)}); use a new --out"
            )
    return counted


class StepGuard:
    """The privacy side of one training stage's steps: every step passes it, once (``ledger=None``: a
    public stage, for which it does nothing).

    Per step t of a private stage: :meth:`allows` (would one more step take ε past the target? then
    stop), :meth:`record` (write-ahead: the step is in the ledger file, and the registry, before the
    data is touched), the step itself, :meth:`verify` (the engine's noised steps and the ledger's
    count agree, or the run stops: never an unbacked ε). The event recorded is what the engine
    actually does: its σ, its sampler's q, its clip norm C.

    On resume (:meth:`resume`), steps the ledger counted after the checkpoint are replays (same
    batch and noise, counted once: :func:`replayed_steps`), unless they were released in a
    checkpoint that is now unusable; those are taken again with fresh draws and counted again
    (``retake``), and the ledger's lead over the step index (:attr:`offset`) goes into every
    later checkpoint.
    """

    def __init__(self, ledger: Ledger | None, *, engine, stage: str, path: Path, target_epsilon: float):
        self.ledger, self.path, self.stage, self.target = ledger, Path(path), stage, target_epsilon
        self.private = ledger is not None and engine.private
        self.event = Release(  # one step of it
            stage=stage,
            mechanism=SUBSAMPLED_GAUSSIAN if engine.private else NON_PRIVATE,
            noise_multiplier=engine.noise_multiplier,  # what the optimizer will actually draw
            sample_rate=engine.sample_rate,  # what the sampler actually uses
            max_grad_norm=engine.max_grad_norm,  # what the optimizer actually clips to
        )
        self.counted = self.start = 0  # the ledger has counted steps < counted (of this attempt's step index)
        self.offset = 0  # steps the ledger counts beyond the step index: taken again with fresh draws

    def resume(self, *, start: int, offset: int, retake: bool) -> int:
        """Continue from a checkpoint at step ``start`` whose ledger lead was ``offset``; ``retake``: the
        steps after ``start`` were released in a checkpoint now unusable. Returns the steps re-taken
        (0 unless ``retake``)."""
        self.start, self.offset = start, offset
        self.counted = replayed_steps(self.ledger, stage=self.stage, start=start, mech=self.event, offset=offset)
        if not (retake and self.ledger is not None):
            return 0
        again = self.counted - start
        self.offset, self.counted = offset + again, start
        return again

    def allows(self, step: int) -> bool:
        """False when step ``step`` (not yet counted) would take the ledger's ε past the target."""
        if step < self.counted or not self.private:
            return True
        extra = [self.event.triple]
        return self.ledger.epsilon(extra=extra) <= self.target * (1 + 1e-9)

    def record(self, step: int) -> None:
        """Write-ahead: count step ``step`` in the ledger (file and registry) before it touches the data."""
        if self.ledger is not None and step >= self.counted:
            self.ledger.record(self.event)
            self.ledger.save(self.path)
            self.counted = step + 1

    def verify(self, step: int, *, noised_steps: int) -> None:
        """After step ``step``: the engine has noised exactly the steps the ledger counts (else stop)."""
        if self.private and (
            self.start + noised_steps != step + 1 or self.ledger.steps(self.stage) != self.counted + self.offset
        ):
            raise RuntimeError("internal error: noised steps and ledger disagree")  # never report an unbacked epsilon

    def epsilon(self) -> float | None:
        """The ledger's ε now; None for a public or non-private stage."""
        return self.ledger.epsilon() if self.private else None


def registry_examples(registry: Registry, dataset) -> list[str] | None:
    """The keyed identities of ``dataset``'s examples in ``registry`` (:meth:`Registry.key_examples`), by which
    runs on the same images in any file format, or on a subset of them, compose; None for a data set whose
    examples are unknown (built by hand): then its fingerprint alone names it."""
    digests = getattr(dataset, "example_digests", None)
    return None if digests is None else registry.key_examples(digests)


def data_identity(dataset: ImageDataset) -> dict:
    """What the ledger records of a data set: name, split (and how a held-out split was drawn), content fingerprint, size."""
    return {"name": dataset.name, **dataset.split_identity, "fingerprint": dataset.fingerprint, "size": len(dataset)}


def release_run(target: str | Path, *, registry=None, missing_ok: bool = False):
    """``privdiff budget release``: free the budget reservation of an abandoned run (crashed, never resumed).

    ``target`` is a run directory, its ``ledger.json``, or a run id (or a unique prefix of one, as
    ``budget status`` shows) in ``registry`` (a :class:`~privdiff.privacy.registry.Registry`; default:
    ``$PRIVDIFF_REGISTRY``). The run's lock is held while its registry entry is changed, so a run that
    is training (or resumes meanwhile) is refused. Its charge becomes what its ledger and the registry
    say it executed (spent steps stay spent). A run id whose directory is not on this machine is
    refused, since nothing shows it is not running elsewhere, unless ``missing_ok`` (then the
    registry's record alone is used). Returns ``(run id, the run's registry entry, freed events)``.
    """
    registry = registry or Registry()
    path = Path(target)
    if path.exists():
        path = path.parent if path.is_file() else path
        if not (path / "ledger.json").is_file():
            raise RunError(f"{path}: no ledger.json (not a private privdiff run)")
        run_id = Ledger.load(path / "ledger.json").run_id
    else:
        run_id, registered = registry.find_run(str(target))
        path = Path(registered) if registered else None
        if path is None or not path.is_dir():
            if not missing_ok:
                raise RunError(
                    f"run {run_id[:12]}: its directory {registered} is not on this machine, so nothing shows that it is "
                    "not running elsewhere; release it from the machine that holds it, or pass --missing-ok if it is gone"
                )
            entry, freed = registry.release(run_id=run_id)
            return run_id, entry, freed
    with held_lock(path):
        ledger = Ledger.load(path / "ledger.json")  # read under the lock: nothing writes it now
        if ledger.run_id != run_id:
            raise RunError(f"{path}: its ledger belongs to run {ledger.run_id[:12]}, not {run_id[:12]}")
        entry, freed = registry.release(run_id=run_id, executed=ledger.events)
    return run_id, entry, freed
