"""Running a study's trials so that a cluster can trust the count: exactly the budget, whatever
happens to the workers.

A worker runs one trial at a time (:func:`run_trials`):

1. **Claim** (:func:`claim`): stale trials (workers that stopped beating) are failed and re-queued
   first; then, under the study's lock (:mod:`storage.locks`), the worker counts the trials that
   hold a slot (finished or running search trials) and creates its trial only while that is below
   the total. Counting and creating under one lock is what makes the total exact with any
   number of workers. When every slot is held but some are still running, the worker waits: a
   running trial may yet fail (its worker killed), and then its slot is redone, so a study never
   ends short.
2. **Run** (:func:`run_one`): a heartbeat thread beats for the trial; the objective runs; the trial
   is told COMPLETE, PRUNED (stopped early) or FAIL with its reason.
3. **Interruption**: SIGTERM (what SLURM and Kubernetes send on preemption) and SIGINT raise
   :class:`Interrupted` in the trial. The trial is recorded FAIL ("interrupted by SIGTERM"), its
   artifacts are removed and its plan is re-queued at once, and the worker exits with one line.
4. **Retries** (:func:`retry`) copy a failed trial's parameters (and a refinement's marks) and
   nothing else: Optuna's own retry callback copies system attributes, so a retried trial listed
   the dead attempt's artifacts.
5. **Artifacts of failed attempts** are deleted (:func:`sweep_artifacts`) when the worker is done,
   so none is left referenced only by a dead trial.

Each worker samples with its own seed (:func:`process_seed`, recorded on every trial it runs):
the sampler seed once depended only on the study seed and the worker index, so every resume, and
every identical worker command on a cluster, replayed the same plans.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState

from models.errors import UserError
from objectives import record
from objectives.objective import is_refinement

MAX_CONSECUTIVE_FAILURES = 5
MAX_RETRIES = 2  # a plan whose attempts keep dying is given up (its slot is sampled anew)
WAIT_SECONDS = 5.0  # how often an idle worker looks again while other workers' trials run
_ARTIFACT_PREFIX = "artifacts:"  # optuna.artifacts' system-attribute prefix
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LockFactory = Callable[[], contextlib.AbstractContextManager[Any]]


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived while a trial ran. A ``BaseException``, so that no ``except
    Exception`` in a technique or the objective swallows it."""

    def __init__(self, signame: str) -> None:
        super().__init__(f"interrupted by {signame}")
        self.signame = signame
        self.requeued = False  # set by run_one: whether the trial's plan went back to the queue

    def message(self, what: str = "trial") -> str:
        """The one line a worker ends with, saying whether the running ``what`` was re-queued."""
        if self.requeued:
            return f"{self}: the running {what} was recorded FAIL and re-queued"
        return (f"{self}: the running {what} was recorded FAIL; not re-queued (no plan sampled yet, "
                "or its retries are spent): its slot is sampled anew")


class _Guard:
    """Where a signal may interrupt: anywhere while idle or inside a trial, but not between
    creating a trial and the first beat of its heartbeat (a trial left RUNNING without a beat
    is never found stale): there it is held and raised as the trial starts."""

    def __init__(self) -> None:
        self.hold = False
        self.pending: str | None = None

    def handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.hold:
            self.pending = name
            return
        raise Interrupted(name)

    def release(self) -> None:
        """Stop holding; raise a signal that arrived meanwhile."""
        self.hold = False
        if self.pending is not None:
            name, self.pending = self.pending, None
            raise Interrupted(name)


_GUARD = _Guard()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While inside, SIGTERM and SIGINT raise :class:`Interrupted` (main thread only; elsewhere
    this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _GUARD.handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _GUARD.hold, _GUARD.pending = False, None


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    # The bookkeeping after an interruption (FAIL, re-queue, artifact removal) must not itself
    # be cut short by a second signal.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def process_seed(explicit: int | None = None) -> int:
    """This worker process's sampler seed: ``explicit`` (``--sampler-seed``, for a reproducible
    single-worker run), else fresh randomness, so resumes and identical workers sample anew."""
    return int(explicit) if explicit is not None else secrets.randbits(31)


def worker_id() -> str:
    """``host:pid`` of this worker, recorded on its trials."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ------------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Beats for one running trial until stopped (a thread), where the storage has heartbeats.

    ``study.ask()`` does not beat, and a trial without a beat is never found stale: :func:`claim`
    records the first beat (:meth:`once`) right after creating the trial."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self._storage, self._trial_id = study._storage, trial._trial_id
        self._interval = getattr(self._storage, "get_heartbeat_interval", lambda: None)()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def once(cls, study: optuna.Study, trial: optuna.Trial) -> None:
        """Record one beat for ``trial`` now (where the storage has heartbeats)."""
        beat = cls(study, trial)
        if beat._interval is not None:
            beat._storage.record_heartbeat(beat._trial_id)

    def __enter__(self) -> Heartbeat:
        if self._interval is not None:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(float(self._interval or 1)):
            with contextlib.suppress(Exception):  # a lost beat is retried at the next interval
                self._storage.record_heartbeat(self._trial_id)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# ----------------------------------------------------------------------------------- budget


def holds_slot(trial: FrozenTrial) -> bool:
    """Whether ``trial`` counts against the budget: a finished (complete or stopped) or running
    search trial. Failed trials do not count (their plan is retried or a new one sampled), nor
    do refinement trials."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return trial.state in states and not is_refinement(trial)


def counted(study: optuna.Study) -> int:
    """Trials holding a slot of the budget (:func:`holds_slot`)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if holds_slot(t))


def fail_stale(study: optuna.Study) -> None:
    """Fail (and re-queue, through the storage's stale-trial callback) trials whose worker
    stopped beating."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def start(study: optuna.Study) -> optuna.Trial:
    """A new running trial (a queued one first) with its first heartbeat. From here until the
    trial runs (:func:`run_one`) a signal is held: a trial created but left without its first
    beat would stay RUNNING forever."""
    _GUARD.hold = True
    try:
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for Study.optimize: this module beats itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            trial = study.ask()
        Heartbeat.once(study, trial)
    except BaseException:
        _GUARD.hold = False
        raise
    return trial


def claim(study: optuna.Study, total: int, lock: LockFactory, *, wait: float = WAIT_SECONDS,
          log: Callable[[str], None] | None = None) -> optuna.Trial | None:
    """A new running trial of ``study`` if the budget ``total`` has a free slot (waiting while
    other workers' trials run and may still fail), else None: the study is done."""
    waited = False
    while True:
        fail_stale(study)
        with lock():
            trials = study.get_trials(deepcopy=False)
            held = sum(1 for t in trials if holds_slot(t))
            # A queued refinement runs whatever the budget says (it holds no slot); a queued
            # search trial (a retry) takes a slot like any other.
            queued = any(t.state == TrialState.WAITING and is_refinement(t) for t in trials)
            if held < total or queued:
                return start(study)
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        if not running:
            return None
        if log is not None and not waited:
            log(f"all {total} slots are taken; waiting for {running} running trial(s) of other workers")
        waited = True
        time.sleep(wait)


# ------------------------------------------------------------------------------ failures


def retry(study: optuna.Study, failed: FrozenTrial) -> bool:
    """Re-queue ``failed``'s plan as a fresh trial: its parameters, a refinement's marks and the
    retry chain, nothing else (no artifacts, no values); return whether its plan is queued. A
    trial that was itself queued (a retry, a refinement) and stopped before its first parameter
    re-queues the parameters it was queued with. Gives up after :data:`MAX_RETRIES`, and on a
    sampled trial stopped before its first parameter (nothing to re-queue: its slot, free again,
    is sampled anew). Also the storage's stale-trial callback
    (:func:`storage.studies.open_storage`)."""
    retries = int(failed.user_attrs.get(record.RETRIES, 0))
    # Optuna keeps a queued trial's parameters in this system attribute until they are suggested.
    params = {**dict(failed.system_attrs.get("fixed_params") or {}), **failed.params}
    if retries >= MAX_RETRIES or not params:
        return False
    # Once per failed trial: a worker interrupted just as another found its trial stale would
    # otherwise queue the plan twice.
    if any(t.user_attrs.get(record.RETRY_OF) == failed.number for t in study.get_trials(deepcopy=False)):
        return True
    keep = (record.REFINE_OF, record.FIDELITY_EPOCHS, record.REFINE_ROUND)
    attrs = {k: failed.user_attrs[k] for k in keep if k in failed.user_attrs}
    attrs.update({record.RETRY_OF: failed.number, record.RETRIES: retries + 1})
    study.enqueue_trial(params, user_attrs=attrs)
    return True


def artifact_ids(trial: FrozenTrial) -> list[str]:
    """The artifacts a trial lists (optuna.artifacts' system attributes)."""
    return [k[len(_ARTIFACT_PREFIX):] for k in trial.system_attrs if k.startswith(_ARTIFACT_PREFIX)]


def sweep_artifacts(study: optuna.Study, store: FileSystemArtifactStore | None) -> int:
    """Delete the artifacts of the study's failed trials (an attempt killed during or after its
    upload); return how many files went. Artifacts of finished trials are never touched."""
    if store is None:
        return 0
    removed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        for artifact_id in artifact_ids(t):
            with contextlib.suppress(Exception):  # already gone, or never written
                store.remove(artifact_id)
                removed += 1
    return removed


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> FrozenTrial:
    with contextlib.suppress(Exception):  # the record is best effort; the state is what counts
        record.write(trial, fail_reason=reason[-2000:])
    return study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def run_one(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], Any],
            store: FileSystemArtifactStore | None = None, marks: dict[str, Any] | None = None) -> FrozenTrial:
    """Run ``objective`` on the claimed ``trial`` (first writing the record fields ``marks``) and
    tell the study how it ended. An :class:`Interrupted` trial is recorded FAIL, its artifacts
    removed, its plan re-queued, and the interruption re-raised."""
    try:
        _GUARD.release()  # a signal held since the claim interrupts the trial here
        with Heartbeat(study, trial):
            if marks:
                record.write(trial, **marks)
            values = objective(trial)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    except Interrupted as exc:
        with _signals_blocked():
            frozen = _fail(study, trial, str(exc))
            if frozen.state == TrialState.FAIL:
                for artifact_id in artifact_ids(frozen):
                    with contextlib.suppress(Exception):
                        if store is not None:
                            store.remove(artifact_id)
                exc.requeued = retry(study, frozen)
        raise
    except Exception as exc:  # a failing plan is recorded and the worker goes on
        import traceback

        return _fail(study, trial, "".join(traceback.format_exception_only(type(exc), exc)).strip())
    return study.tell(trial, values, skip_if_finished=True)


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], Any], total: int,
               lock: LockFactory, *, sampler_seed: int | None = None,
               callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
               store: FileSystemArtifactStore | None = None,
               log: Callable[[str], None] | None = None) -> None:
    """Claim and run trials until the budget ``total`` is spent (see the module docstring);
    stop with one line when :data:`MAX_CONSECUTIVE_FAILURES` trials fail in a row or a signal
    arrives."""
    failures = 0
    me = worker_id()
    with interruptible():
        try:
            while True:
                trial = claim(study, total, lock, log=log)
                if trial is None:
                    break
                marks: dict[str, Any] = {record.WORKER: me}
                if sampler_seed is not None:
                    marks[record.SAMPLER_SEED] = sampler_seed
                frozen = run_one(study, trial, objective, store, marks)
                for callback in callbacks:
                    callback(study, frozen)
                failures = failures + 1 if frozen.state == TrialState.FAIL else 0
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    reason = str(frozen.user_attrs.get(record.FAIL_REASON) or "see the log")
                    raise UserError(f"{failures} trials failed in a row; last: {reason.splitlines()[-1][:300]}")
        except Interrupted as exc:
            raise UserError(exc.message()) from None
        finally:
            with contextlib.suppress(Exception):
                sweep_artifacts(study, store)
