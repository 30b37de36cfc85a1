"""Privacy accounting for DP-SGD: ε from RDP, noise calibration, the spent-privacy ledger and privacy.json.

Every ε here comes from `dp_accounting.rdp.RdpAccountant` (the accountant TF-Privacy uses) applied to the
Poisson-subsampled Gaussian mechanism under add-or-remove-one-example adjacency, with per-example clipping
(sensitivity = clip norm, so no microbatching factor of two). It covers the release of every intermediate
model, not only the final one.

This module imports only `dp_accounting`; TensorFlow Privacy (and with it TensorFlow) is loaded lazily by
`tf_privacy_statement`.
"""

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence

import dp_accounting
from dp_accounting import rdp

from eqdp_tf.checks import finite_number, whole_number
from eqdp_tf.errors import PrivacyError
from eqdp_tf.io import write_text_atomic

ACCOUNTANT = "RDP"
SAMPLING_METHODS = ("poisson", "shuffle")
# Calibration gives up beyond this noise multiplier: no practical run uses more.
MAX_NOISE_MULTIPLIER = 1e4


# ---------------------------------------------------------------------------------------------------------------
# Validation


def _as_real(name: str, value: Any) -> float:
    """Returns `value` as a finite float, or raises PrivacyError naming the argument."""
    return finite_number(name, value, error=PrivacyError)


def _as_count(name: str, value: Any) -> int:
    """Returns `value` as an int >= 0, or raises PrivacyError naming the argument."""
    return whole_number(name, value, error=PrivacyError)


def validate_privacy_params(
    noise_multiplier=None,
    sampling_rate=None,
    steps=None,
    delta=None,
    l2_norm_clip=None,
    dataset_size=None,
) -> List[str]:
    """Checks whichever DP-SGD parameters are given; arguments left as None are not checked.

    Raises:
        PrivacyError: for an impossible value (σ < 0, q outside (0, 1], steps < 0, δ outside (0, 1),
            clip <= 0, dataset_size < 1).

    Returns:
        Warnings (strings) for legal but weak settings: δ >= 1/N.
    """
    if noise_multiplier is not None and _as_real("noise_multiplier", noise_multiplier) < 0:
        raise PrivacyError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if sampling_rate is not None and not 0 < _as_real("sampling_rate", sampling_rate) <= 1:
        raise PrivacyError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
    if steps is not None:
        _as_count("steps", steps)
    if delta is not None and not 0 < _as_real("delta", delta) < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}.")
    if l2_norm_clip is not None and not _as_real("l2_norm_clip", l2_norm_clip) > 0:
        raise PrivacyError(f"l2_norm_clip must be > 0, got {l2_norm_clip}.")
    if dataset_size is not None and _as_count("dataset_size", dataset_size) < 1:
        raise PrivacyError(f"dataset_size must be >= 1, got {dataset_size}.")

    warnings = []
    if delta is not None and dataset_size is not None and delta * dataset_size >= 1:
        warnings.append(
            f"delta={delta} is not below 1/dataset_size={1 / dataset_size:.3g}, a weak guarantee that "
            f"allows a whole example to leak; use delta < 1/{dataset_size}."
        )
    return warnings


def _check_orders(orders: Optional[Sequence[float]]) -> Optional[List[float]]:
    if orders is None:
        return None
    orders = [_as_real("RDP order", a) for a in orders]
    if not orders or min(orders) <= 1:
        raise PrivacyError(f"orders must be a non-empty list of RDP orders > 1, got {orders}.")
    return orders


# ---------------------------------------------------------------------------------------------------------------
# ε from RDP


def _dp_sgd_event(sampling_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    """`steps` DP-SGD steps: the Poisson-subsampled Gaussian mechanism composed with itself."""
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_probability=sampling_rate,
            event=dp_accounting.GaussianDpEvent(noise_multiplier),
        ),
        steps,
    )


def _epsilon_of_events(events: Sequence[dp_accounting.DpEvent], delta: float, orders) -> float:
    accountant = rdp.RdpAccountant(orders)
    accountant.compose(dp_accounting.ComposedDpEvent(list(events)))
    return float(accountant.get_epsilon(delta))


def compute_epsilon(noise_multiplier, sampling_rate, steps, delta, orders=None) -> float:
    """ε after `steps` DP-SGD steps with Poisson sampling rate q and noise multiplier σ, at `delta`.

    `orders` are the RDP orders to optimise over (default: dp_accounting's, which TF-Privacy uses too).
    Returns 0.0 for steps = 0 and inf for σ = 0 (no noise, no guarantee).
    """
    validate_privacy_params(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps, delta=delta)
    orders = _check_orders(orders)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = _dp_sgd_event(float(sampling_rate), float(noise_multiplier), int(steps))
    return _epsilon_of_events([event], float(delta), orders)


def calibrate_noise_multiplier(target_epsilon, sampling_rate, steps, delta, tolerance=0.01, spent=None) -> float:
    """The smallest σ, to within `tolerance`, whose ε after `steps` steps is at most `target_epsilon`.

    With `spent` (a `PrivacyLedger` of steps already taken), ε is that of those steps composed with the `steps`
    new ones: the σ for the rest of a run whose settings changed. Bisection keeps an interval [lo, hi] with
    ε(lo) > target >= ε(hi) and returns hi once hi - lo <= tolerance, so the result always meets the target and
    ε(result - tolerance) > target. With steps = 0 nothing more is spent, so 0.0 is returned.

    Raises:
        PrivacyError: if target_epsilon is not a finite number > 0, tolerance is not > 0, the steps already spent
            reach the target, or the target needs σ > MAX_NOISE_MULTIPLIER.
    """
    target = _as_real("target_epsilon", target_epsilon)
    if target <= 0:
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon}.")
    if not _as_real("tolerance", tolerance) > 0:
        raise PrivacyError(f"tolerance must be > 0, got {tolerance}.")
    validate_privacy_params(sampling_rate=sampling_rate, steps=steps, delta=delta)
    if steps == 0:
        return 0.0
    if spent is not None and spent.segments:
        already = spent.epsilon(delta)
        if already >= target:
            raise PrivacyError(f"the {spent.total_steps} steps already taken spent epsilon {already:.4g}, "
                               f"not below the target {target_epsilon}")

    def epsilon(sigma):
        if spent is None or not spent.segments:
            return compute_epsilon(sigma, sampling_rate, steps, delta)
        ledger = PrivacyLedger(spent.segments)
        ledger.record(sampling_rate, sigma, steps)
        return ledger.epsilon(delta)

    lo, hi = 0.0, 1.0  # ε(0) = inf > target.
    while epsilon(hi) > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier={MAX_NOISE_MULTIPLIER:g} "
                f"gives epsilon={epsilon(hi):.4g} for sampling_rate={sampling_rate}, steps={steps}, delta={delta}."
            )
        lo, hi = hi, min(2 * hi, MAX_NOISE_MULTIPLIER)
    while hi - lo > tolerance:
        mid = 0.5 * (lo + hi)
        if epsilon(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


# ---------------------------------------------------------------------------------------------------------------
# Ledger of spent privacy


class Segment(NamedTuple):
    """`steps` consecutive DP-SGD steps with the same sampling rate and noise multiplier."""

    sampling_rate: float
    noise_multiplier: float
    steps: int


class PrivacyLedger:
    """The privacy spent so far, as a list of `Segment`s composed with RDP.

    Segments may differ (for example after resuming with another batch size); ε composes every segment's
    Poisson-subsampled Gaussian, each self-composed `steps` times. The JSON form is plain dicts and lists, so it
    can be stored in a checkpoint and in privacy.json.
    """

    def __init__(self, segments: Iterable = ()):
        """`segments`: (sampling_rate, noise_multiplier, steps) triples, recorded in order."""
        self._segments: List[Segment] = []
        for segment in segments:
            self.record(*segment)

    def record(self, sampling_rate, noise_multiplier, steps=1) -> None:
        """Adds `steps` steps; merges into the last segment if q and σ are equal. steps = 0 is a no-op."""
        validate_privacy_params(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
        steps = int(steps)
        if steps == 0:
            return
        sampling_rate, noise_multiplier = float(sampling_rate), float(noise_multiplier)
        if self._segments and self._segments[-1][:2] == (sampling_rate, noise_multiplier):
            last = self._segments[-1]
            self._segments[-1] = last._replace(steps=last.steps + steps)
        else:
            self._segments.append(Segment(sampling_rate, noise_multiplier, steps))

    @property
    def segments(self) -> List[Segment]:
        return list(self._segments)

    @property
    def total_steps(self) -> int:
        return sum(segment.steps for segment in self._segments)

    def epsilon(self, delta, orders=None) -> float:
        """ε of everything recorded, at `delta`: 0.0 when empty, inf if any segment had σ = 0."""
        validate_privacy_params(delta=delta)
        orders = _check_orders(orders)
        if not self._segments:
            return 0.0
        if any(segment.noise_multiplier == 0 for segment in self._segments):
            return math.inf
        events = [_dp_sgd_event(*segment) for segment in self._segments]
        return _epsilon_of_events(events, float(delta), orders)

    def to_json(self) -> Dict[str, Any]:
        return {"accountant": ACCOUNTANT, "segments": [segment._asdict() for segment in self._segments]}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "PrivacyLedger":
        """Inverse of `to_json`; raises PrivacyError for anything that is not a ledger."""
        if not isinstance(data, dict) or not isinstance(data.get("segments"), list):
            raise PrivacyError(f"a privacy ledger must be a dict with a 'segments' list, got {data!r}.")
        if data.get("accountant", ACCOUNTANT) != ACCOUNTANT:
            raise PrivacyError(f"privacy ledger accountant must be {ACCOUNTANT!r}, got {data['accountant']!r}.")
        ledger = cls()
        for segment in data["segments"]:
            if not isinstance(segment, dict) or set(segment) != set(Segment._fields):
                raise PrivacyError(f"a ledger segment must have exactly the keys {Segment._fields}, got {segment!r}.")
            ledger.record(**segment)
        return ledger

    def __eq__(self, other):
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._segments == other._segments

    def __repr__(self):
        return f"PrivacyLedger({[tuple(segment) for segment in self._segments]})"


# ---------------------------------------------------------------------------------------------------------------
# Report (privacy.json) and TF-Privacy's statement

_BASE_NOTE = (
    "Epsilon is example-level DP with add-or-remove-one adjacency from RDP accounting of the Poisson-subsampled "
    "Gaussian mechanism; it covers every intermediate model, not only the final one."
)
_SHUFFLE_NOTE = (
    "Epsilon assumes Poisson sampling, but batches were drawn by shuffling; the accounting does not formally "
    "cover shuffled batches, so the true epsilon may be larger."
)


@dataclasses.dataclass
class PrivacyReport:
    """The guarantee of one training run, written to privacy.json. Construct it with keywords.

    `note` is completed in `__post_init__`: it always starts with the standard explanation, plus the
    Poisson-sampling caveat for sampling_method 'shuffle', followed by any text passed in. `ledger` optionally
    holds `PrivacyLedger.to_json()` when the run had more than one segment. An infinite epsilon (σ = 0) is
    written as null.
    """

    noise_multiplier: float
    sampling_rate: float
    sampling_method: str
    steps: int
    batch_size: int
    dataset_size: int
    l2_norm_clip: float
    delta: float
    epsilon: float
    accountant: str = ACCOUNTANT
    note: str = ""
    ledger: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        if self.accountant != ACCOUNTANT:
            raise PrivacyError(f"accountant must be {ACCOUNTANT!r}, got {self.accountant!r}.")
        if self.sampling_method not in SAMPLING_METHODS:
            raise PrivacyError(f"sampling_method must be one of {SAMPLING_METHODS}, got {self.sampling_method!r}.")
        validate_privacy_params(
            noise_multiplier=self.noise_multiplier,
            sampling_rate=self.sampling_rate,
            steps=self.steps,
            delta=self.delta,
            l2_norm_clip=self.l2_norm_clip,
            dataset_size=self.dataset_size,
        )
        if _as_count("batch_size", self.batch_size) < 1:
            raise PrivacyError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.epsilon is None:
            self.epsilon = math.inf
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, numbers.Real) or not self.epsilon >= 0:
            raise PrivacyError(f"epsilon must be a number >= 0 (or inf), got {self.epsilon!r}.")
        standard = [_BASE_NOTE] + ([_SHUFFLE_NOTE] if self.sampling_method == "shuffle" else [])
        extra = self.note.strip()
        for sentence in standard:  # Re-reading a written report must not repeat the standard text.
            extra = extra.replace(sentence, "").strip()
        self.note = " ".join(standard + ([extra] if extra else []))

    @classmethod
    def from_ledger(cls, ledger: PrivacyLedger, *, delta, batch_size, dataset_size, l2_norm_clip,
                    sampling_method="poisson", note="") -> "PrivacyReport":
        """A report for everything in `ledger`; with several segments, σ and q are those of the last one."""
        if not ledger.segments:
            raise PrivacyError("cannot report on an empty privacy ledger; record the training steps first.")
        last = ledger.segments[-1]
        several = len(ledger.segments) > 1
        if several:
            note = (f"Epsilon composes {len(ledger.segments)} segments with different parameters (see ledger); "
                    f"noise_multiplier and sampling_rate are those of the last. {note}")
        return cls(
            noise_multiplier=last.noise_multiplier,
            sampling_rate=last.sampling_rate,
            sampling_method=sampling_method,
            steps=ledger.total_steps,
            batch_size=batch_size,
            dataset_size=dataset_size,
            l2_norm_clip=l2_norm_clip,
            delta=delta,
            epsilon=ledger.epsilon(delta),
            note=note,
            ledger=ledger.to_json() if several else None,
        )

    def to_json(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        data["epsilon"] = None if math.isinf(self.epsilon) else float(self.epsilon)
        return data

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "PrivacyReport":
        """Reads a report back; keys the report does not define (the training loop adds its own, such as
        ``steps_spent``) are ignored, missing ones raise PrivacyError."""
        if not isinstance(data, dict):
            raise PrivacyError(f"a privacy report must be a dict, got {type(data).__name__}.")
        names = {field.name for field in dataclasses.fields(cls)}
        required = {field.name for field in dataclasses.fields(cls)
                    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise PrivacyError(f"privacy report is missing {', '.join(missing)}.")
        report = cls(**{k: v for k, v in data.items() if k in names})
        if report.epsilon is None:
            report = dataclasses.replace(report, epsilon=math.inf)
        return report

    def write(self, path: str) -> str:
        """Writes the report as JSON to `path` (a file, or a folder that gets privacy.json) atomically.

        The text goes to a temporary file in the same folder, which then replaces `path` with `os.replace`, so
        readers see the old file or the new one, never half of one. Returns the file written.
        """
        if os.path.isdir(path):
            path = os.path.join(path, "privacy.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_text_atomic(path, json.dumps(self.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n")
        return path


def tf_privacy_statement(dataset_size, batch_size, steps, noise_multiplier, delta, max_examples_per_user=None) -> str:
    """TF-Privacy's `compute_dp_sgd_privacy_statement` text for the log, with used_microbatching=False.

    Our DP step clips every example separately, so the default used_microbatching=True would halve σ and
    overstate ε. TF-Privacy takes epochs and rounds steps = ceil(epochs / q) up; the epochs passed here are nudged
    down by a few ulps when needed so that it accounts exactly `steps` steps, matching `compute_epsilon`.
    """
    validate_privacy_params(noise_multiplier=noise_multiplier, steps=steps, delta=delta, dataset_size=dataset_size)
    if _as_count("batch_size", batch_size) < 1 or batch_size > dataset_size:
        raise PrivacyError(f"batch_size must be in [1, dataset_size={dataset_size}], got {batch_size}.")
    if steps < 1:
        raise PrivacyError(f"TF-Privacy's statement needs steps >= 1, got {steps}.")
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib  # Lazy: imports TensorFlow.

    sampling_rate = batch_size / dataset_size  # The same expression TF-Privacy uses.
    num_epochs = steps * sampling_rate
    while math.ceil(num_epochs / sampling_rate) > steps:
        num_epochs = math.nextafter(num_epochs, 0.0)
    return compute_dp_sgd_privacy_lib.compute_dp_sgd_privacy_statement(
        number_of_examples=int(dataset_size),
        batch_size=int(batch_size),
        num_epochs=num_epochs,
        noise_multiplier=float(noise_multiplier),
        delta=float(delta),
        used_microbatching=False,
        max_examples_per_user=max_examples_per_user,
    )
