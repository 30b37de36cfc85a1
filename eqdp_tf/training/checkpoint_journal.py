"""The privacy journal ``privacy_journal.jsonl``: a durable, append-only record of the privacy a run has spent.

A DP run is a privacy budget being spent, and a crash must never make the reported epsilon smaller than what
was spent. The journal is one JSON object per line:

- ``{"event": "start", "attempt": a, "step": c, ...}``: process number ``a`` starts training at step ``c``
  (the step of the checkpoint it resumed from), with its privacy settings.
- ``{"event": "step", "attempt": a, "step": t, "sampling_rate": q, "noise_multiplier": sigma, ...}``: the noised
  update of step ``t`` was applied (in memory). Written before anything derived from it leaves the process.
- ``{"event": "release", "attempt": a, "step": r, "what": ...}``: the state after step ``r`` is about to be
  written out (a checkpoint, and after it the evaluation, or the export). Flushed and fsynced *before* the
  output is written, so the journal on disk always covers every output.

**What counts as spent.** An update can be observed only through the run's outputs: checkpoints (also a
partly written one), exported models, and the test metrics of the EMA weights. The loop evaluates only at
checkpointed steps, so the released outputs are exactly the states announced by release records. The steps
of a process up to its last release are spent; a step taken after it was never written anywhere (its
update died with the process) and is *discarded*: it is not counted, and is taken again on resume. With
this rule a run that is killed and resumed, any number of times, reports the epsilon of an uninterrupted
run. The one exception is counted conservatively: when a released state is lost (a checkpoint whose write
was interrupted, or one found unreadable), its steps count as spent *and* are re-taken, with fresh sampling
and noise (see ``privacy.randomness``); both takes count, so epsilon then covers more steps than the model has.

Not covered, with or without crashes: the training loss and accuracy in the progress lines, TensorBoard's
``train/*`` scalars and metrics.jsonl's ``loss``/``train_accuracy``. They are computed from the private
batches without noise, as in most DP-SGD code, and are diagnostics outside the guarantee.
"""

import json
import os
from typing import Any, Dict, List, NamedTuple, Optional

from eqdp_tf.errors import UserError, one_line
from eqdp_tf.io import fsync_dir
from eqdp_tf.privacy import accounting

JOURNAL_NAME = "privacy_journal.jsonl"
# Its name in run folders written before it was renamed (the in-memory accounting object is the ledger).
LEGACY_JOURNAL_NAME = "privacy_ledger.jsonl"
EVENTS = ("start", "step", "release")
_STEP_FIELDS = ("sampling_rate", "noise_multiplier", "l2_norm_clip", "dataset_size")


class JournalError(UserError):
    """The privacy journal is missing, damaged or inconsistent with the checkpoints: the spend is unknown."""


class StepRecord(NamedTuple):
    attempt: int
    step: int
    sampling_rate: float
    noise_multiplier: float
    l2_norm_clip: float
    dataset_size: int


class ResumePlan(NamedTuple):
    """What resuming from the checkpoint at ``start`` means for the privacy accounting."""

    start: int
    discarded: List[int]  # step numbers taken by earlier processes, never released, not counted
    retaken: List[int]  # step numbers released by an earlier process but lost: taken again, counted twice
    salts: Dict[int, int]  # step -> salt for fresh randomness (the retaken ones)


def _ranges(steps):
    """'3-5, 9' for [3, 4, 5, 9]."""
    parts, steps = [], sorted(set(steps))
    i = 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        parts.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(parts)


class PrivacyJournal:
    """Reads ``path`` if it exists; ``begin`` opens it for appending as a new attempt (process)."""

    def __init__(self, path: str):
        self.path = path
        self.records: List[Dict[str, Any]] = []
        self._valid_bytes = 0
        self._file = None
        self.attempt: Optional[int] = None
        if os.path.exists(path):
            self._load()

    # ---------------------------------------------------------------------------------------------- reading

    def _load(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise JournalError(f"cannot read the privacy journal {self.path}: {one_line(err)}") from None
        lines = data.split(b"\n")
        # A final piece without a newline is an append cut short by a crash: its release never began, so dropping
        # it is safe (records are fsynced before the output they announce).
        complete = lines[:-1]
        for number, line in enumerate(complete, 1):
            try:
                record = json.loads(line)
                self._check(record)
            except (ValueError, TypeError, KeyError) as err:
                raise JournalError(
                    f"the privacy journal {self.path} is damaged at line {number} ({err}); the privacy already "
                    "spent cannot be established, so the run cannot be resumed: start it in a new folder"
                ) from None
            self.records.append(record)
        self._valid_bytes = len(data) - len(lines[-1])

    @staticmethod
    def _check(record):
        if not isinstance(record, dict) or record.get("event") not in EVENTS:
            raise ValueError(f"unknown record {record!r}")
        for key in ("attempt", "step"):
            if isinstance(record[key], bool) or not isinstance(record[key], int) or record[key] < 0:
                raise ValueError(f"bad {key} in {record!r}")
        if record["event"] == "step":
            accounting.validate_privacy_params(
                sampling_rate=record["sampling_rate"], noise_multiplier=record["noise_multiplier"])

    @property
    def has_steps(self) -> bool:
        return any(r["event"] == "step" for r in self.records)

    def last_start(self) -> Optional[Dict[str, Any]]:
        starts = [r for r in self.records if r["event"] == "start"]
        return starts[-1] if starts else None

    def _attempts(self):
        """{attempt: (start record or None, [StepRecord], last released step or None)} in journal order."""
        attempts: Dict[int, list] = {}
        for r in self.records:
            entry = attempts.setdefault(r["attempt"], [None, [], None])
            if r["event"] == "start":
                entry[0] = r
            elif r["event"] == "step":
                entry[1].append(StepRecord(r["attempt"], r["step"], *(r[k] for k in _STEP_FIELDS)))
            else:
                entry[2] = r["step"] if entry[2] is None else max(entry[2], r["step"])
        return attempts

    def steps(self, pending=False) -> List[StepRecord]:
        """Steps counted as spent: each attempt's steps up to its last release; ``pending`` adds the current
        attempt's steps not released yet (what would be spent if the state were written out now)."""
        counted = []
        for attempt, (_, steps, released) in self._attempts().items():
            for s in steps:
                if (released is not None and s.step <= released) or (pending and attempt == self.attempt):
                    counted.append(s)
        return counted

    def ledger(self, pending=False) -> accounting.PrivacyLedger:
        ledger = accounting.PrivacyLedger()
        for s in self.steps(pending):
            ledger.record(s.sampling_rate, s.noise_multiplier)
        return ledger

    def discarded_steps(self) -> List[int]:
        """Step numbers of earlier attempts that were never released (not counted)."""
        out = []
        for attempt, (_, steps, released) in self._attempts().items():
            if attempt != self.attempt:
                out += [s.step for s in steps if released is None or s.step > released]
        return out

    def summary(self, model_steps: int) -> Dict[str, Any]:
        spent = self.steps()
        return {
            "model_steps": int(model_steps),
            "steps_spent": len(spent),
            "steps_counted_twice": len(spent) - len({s.step for s in spent}),
            "steps_discarded": len(self.discarded_steps()),
            "journal": JOURNAL_NAME,
        }

    def released_final(self, steps: int, what: str) -> bool:
        """True when an earlier process released ``what`` ("export" or "checkpoint") of the state after ``steps``:
        the run reached its end and showed it to the world, so it is finished whatever became of its checkpoints."""
        return any(r["event"] == "release" and r["step"] >= steps and r.get("what") == what for r in self.records)

    def plan_resume(self, start: int) -> ResumePlan:
        """Checks the journal covers the checkpoint at ``start`` and works out which steps to re-take afresh."""
        spent = {s.step for s in self.steps()}
        missing = [t for t in range(1, start + 1) if t not in spent]
        if missing:
            raise JournalError(
                f"the checkpoint of step {start} holds steps {_ranges(missing)} that the privacy journal "
                f"{self.path} does not record as spent; the privacy already spent cannot be established: start "
                "the run in a new folder"
            )
        attempt = 1 + max((r["attempt"] for r in self.records), default=0)
        retaken = sorted(t for t in spent if t > start)
        return ResumePlan(start, sorted(set(self.discarded_steps()) - spent), retaken,
                          {t: attempt for t in retaken})

    # ---------------------------------------------------------------------------------------------- writing

    def begin(self, start: int, settings: Dict[str, Any]) -> int:
        """Opens the journal for appending as a new attempt starting at step ``start``; returns its number."""
        self.attempt = 1 + max((r["attempt"] for r in self.records), default=0)
        new_file = not os.path.exists(self.path)
        try:
            self._file = open(self.path, "r+b" if not new_file else "wb")
            self._file.truncate(self._valid_bytes)  # drop a torn last line
            self._file.seek(self._valid_bytes)
            if new_file:
                fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as err:
            raise JournalError(f"cannot write the privacy journal {self.path}: {one_line(err)}") from None
        self._append({"event": "start", "step": int(start), **settings}, durable=True)
        return self.attempt

    def record_step(self, step, sampling_rate, noise_multiplier, l2_norm_clip, dataset_size):
        """Records that the noised update of ``step`` exists (in memory); call before anything derived from it
        is written. Not fsynced: the next ``record_release`` makes it durable before any output."""
        self._append({"event": "step", "step": int(step), "sampling_rate": float(sampling_rate),
                      "noise_multiplier": float(noise_multiplier), "l2_norm_clip": float(l2_norm_clip),
                      "dataset_size": int(dataset_size)}, durable=False)

    def record_release(self, step, what):
        """Makes the record of every step up to ``step`` durable, then announces the output ``what``."""
        self._append({"event": "release", "step": int(step), "what": what}, durable=True)

    def _append(self, record, durable):
        if self._file is None:
            raise RuntimeError("PrivacyJournal.begin() must be called before recording")
        record = {"event": record["event"], "attempt": self.attempt, **record}
        line = json.dumps(record, sort_keys=False, allow_nan=False)
        try:
            self._file.write(line.encode() + b"\n")
            self._file.flush()
            if durable:
                os.fsync(self._file.fileno())
        except OSError as err:
            raise JournalError(f"cannot write the privacy journal {self.path} ({one_line(err)}); "
                               "stopped before writing anything that it would not cover") from None
        self.records.append(record)

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def describe_steps(steps) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    return _ranges(steps)


def adopt_legacy_journal(folder):
    """Renames a run folder's journal from its old name (``privacy_ledger.jsonl``) to ``JOURNAL_NAME``, so that a
    run started by an earlier version resumes; returns True if it did."""
    old, new = os.path.join(folder, LEGACY_JOURNAL_NAME), os.path.join(folder, JOURNAL_NAME)
    if not os.path.exists(old) or os.path.exists(new):
        return False
    os.rename(old, new)
    fsync_dir(folder)
    return True
