"""Drift watch: has the line changed since the model was calibrated?

One :class:`DriftWatch` per model and station keeps the last ``window`` decisions (score and
flag) and runs two one-sided tests on them after every decision:

- **Flag rate.** ``k`` of the ``n`` decisions in the window were flagged. The calibration
  expects a share ``r`` of good parts flagged, and the share one calibration really gives is
  uncertain: ``Calibration.false_alarm_interval`` is its 90% interval. The test is exact and
  binomial, against the interval's upper end ``u`` (so that a calibration that merely landed
  high in its own interval does not alarm): ``p = P(Binomial(n, u) >= k)``. A model of format 1
  (no interval) is tested the same way against the interval its rule implies: its cut is the
  highest of ``m`` held-out scores, so its realised rate follows Beta(1, m).
- **Score shift.** A one-sided Mann-Whitney test: are the window's scores higher than the
  calibration's good scores (the leave-one-out scores of the training images,
  ``Calibration.good_scores``)? The statistic ``U`` counts the pairs (window image, good image)
  where the window image scores higher; ``p`` is the normal approximation's upper tail with the
  continuity correction (scipy's ``mannwhitneyu(..., alternative="greater",
  method="asymptotic")``; scores are continuous, so no tie correction). The test is kept
  incrementally: each score's count of lower good scores is found once by bisection, so an
  update costs O(log m) and a status a few microseconds. It sees a drift before images cross
  the threshold: the whole distribution moving up moves ``U``, flags or not. It is one-sided
  because falling scores do not raise false alarms, and a one-sided test sees rising ones with
  fewer images. Its null hypothesis counts both samples as random (the usual two-sample
  variance), so that the uncertainty of the good scores themselves, like that of the flag rate
  above, does not alarm. Models without good scores (format 1) report it as not available.

The alarm is raised when either p-value is below its level, once the window holds at least
``min_decisions`` decisions.

**Choices.** ``window = 200`` decisions: long enough that the flag-rate test sees a rise from
5% to about 20% and the rank test a moderate shift, short enough that a change fills most of the
window within the 300 images the issue allows. Levels ``1e-5`` for each test: each is an exact
(binomial) or well-approximated (Mann-Whitney with m, n >= 50) test, so on a line that has not
changed each raises the alarm at a given decision with probability at most 1e-5; the two together
at most 2e-5, i.e. at most 0.2 alarmed decisions expected per 10,000 even though every decision is
a test (the issue asks for at most 1 per 10,000). The tests at neighbouring decisions share most of
their window, so false alarms, when they come, come in short runs. Measured on bottle
(``benchmarks/drift.py``, docs/drift.md): no alarm over 20,000 unchanged decisions, and brightness
-20%, a slight blur and JPEG quality 30 seen within 300 images.

The watch is pure numpy/scipy (no PyTorch): the server calls :meth:`DriftWatch.add` on its
event loop once per decision.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from scipy.special import bdtrc, betaincinv, ndtr  # (not scipy.stats: 0.9 s of a server's start)

from ..calibrate import INTERVAL_CONFIDENCE, Calibration

#: decisions in the rolling window
DEFAULT_WINDOW = 200
#: level of the flag-rate test: the probability that it alarms at one decision on an unchanged line
DEFAULT_RATE_LEVEL = 1e-5
#: level of the score-shift test
DEFAULT_SHIFT_LEVEL = 1e-5
#: no test on fewer decisions (a server just started): too few to say anything at these levels
DEFAULT_MIN_DECISIONS = 50


@dataclass(frozen=True)
class DriftStatus:
    """Where a window stands: what it holds, both tests' p-values, and whether they alarm.

    p-values are None when a test did not run (too few decisions, or the model lacks what it
    needs: good scores for the shift test).
    """

    decisions: int  # decisions in the window now
    window: int  # the window's size
    flagged: int
    flag_rate: float | None  # flagged / decisions (None with no decisions)
    expected_flag_rate: float | None  # what the calibration expects
    interval: tuple[float, float] | None  # its 90% interval
    tested_flag_rate: float | None  # the rate the binomial test is against (the interval's upper end)
    flag_rate_p_value: float | None
    score_shift: float | None  # share of (window, good) pairs where the window's image scores higher; 0.5 expected
    score_shift_p_value: float | None
    alarm: bool
    reason: str  # one line a person can read
    rate_level: float = DEFAULT_RATE_LEVEL
    shift_level: float = DEFAULT_SHIFT_LEVEL

    @property
    def full(self) -> bool:
        return self.decisions >= self.window

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (an interval as a two-item list)."""
        return {
            "decisions": self.decisions,
            "window": self.window,
            "flagged": self.flagged,
            "flag_rate": self.flag_rate,
            "expected_flag_rate": self.expected_flag_rate,
            "interval": None if self.interval is None else [self.interval[0], self.interval[1]],
            "tested_flag_rate": self.tested_flag_rate,
            "flag_rate_p_value": self.flag_rate_p_value,
            "score_shift": self.score_shift,
            "score_shift_p_value": self.score_shift_p_value,
            "rate_level": self.rate_level,
            "shift_level": self.shift_level,
            "alarm": self.alarm,
            "reason": self.reason,
        }


def _percent(value: float) -> str:
    return f"{value:.1%}"


class DriftWatch:
    """Rolling window of one model's and one station's last decisions, tested against its calibration.

    ``calibration`` is the model's :class:`~patchcore.calibrate.Calibration` (or its stored dict,
    ``metadata["calibration"]``). :meth:`add` takes each decision and returns the new status.
    """

    def __init__(
        self,
        calibration: Calibration | Mapping[str, Any],
        window: int = DEFAULT_WINDOW,
        rate_level: float = DEFAULT_RATE_LEVEL,
        shift_level: float = DEFAULT_SHIFT_LEVEL,
        min_decisions: int = DEFAULT_MIN_DECISIONS,
        recent: Iterable[tuple[float, bool]] = (),
    ) -> None:
        if not isinstance(calibration, Calibration):
            calibration = Calibration.from_dict(dict(calibration))
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"drift window must be a whole number of decisions, at least 1, got {window}")
        for name, level in (("rate", rate_level), ("shift", shift_level)):
            if not 0 < level < 1:
                raise ValueError(f"drift {name} level must be between 0 and 1, got {level}")
        self.calibration = calibration
        self.window = window
        self.rate_level = float(rate_level)
        self.shift_level = float(shift_level)
        self.min_decisions = max(1, min(int(min_decisions), window))
        self.expected_rate, self.interval = _expected_rate(calibration)
        # The binomial test's rate: the interval's upper end (the calibration's own uncertainty is no drift).
        self.tested_rate = self.interval[1] if self.interval is not None else self.expected_rate
        self.good = sorted(float(s) for s in calibration.good_scores if math.isfinite(s))
        # (is_anomalous, twice the count of good scores below the score, ties counting half): integers, so the sums stay exact
        self._entries: deque[tuple[bool, int]] = deque()
        self._flagged = 0
        self._twice_u = 0
        for score, is_anomalous in list(recent)[-self.window :]:
            self._push(score, is_anomalous)
        self._status = self._evaluate()

    @classmethod
    def from_decisions(
        cls, calibration: Calibration | Mapping[str, Any], decisions: Iterable[tuple[float, bool]], **options: Any
    ) -> "DriftWatch":
        """A watch holding recent decisions, ``(score, is_anomalous)`` oldest first (the record read
        back at a server's start); only the last ``window`` count."""
        return cls(calibration, recent=decisions, **options)

    def add(self, score: float, is_anomalous: bool) -> DriftStatus:
        """Take one decision; return the status with it in the window."""
        self._push(score, is_anomalous)
        self._status = self._evaluate()
        return self._status

    def status(self) -> DriftStatus:
        return self._status

    def describe(self) -> str:
        """The rule in one line (for reports)."""
        return (
            f"last {self.window} decisions (tests from {self.min_decisions}): flag rate, one-sided binomial test against the upper end "
            f"of the calibration's {INTERVAL_CONFIDENCE:.0%} interval, level {self.rate_level:g}; scores against the calibration's good "
            f"scores, one-sided Mann-Whitney test (asymptotic), level {self.shift_level:g}"
        )

    # -----------------------------------------------------------------------------------------

    def _push(self, score: float, is_anomalous: bool) -> None:
        score = float(score)
        is_anomalous = bool(is_anomalous)
        if math.isfinite(score):
            twice = bisect.bisect_left(self.good, score) + bisect.bisect_right(self.good, score)
        else:  # an unscored image cannot be ranked; count it as a typical one
            twice = len(self.good)
        if len(self._entries) == self.window:
            old_flag, old_twice = self._entries.popleft()
            self._flagged -= old_flag
            self._twice_u -= old_twice
        self._entries.append((is_anomalous, twice))
        self._flagged += is_anomalous
        self._twice_u += twice

    def _evaluate(self) -> DriftStatus:
        n, k = len(self._entries), self._flagged
        rate = k / n if n else None
        testing = n >= self.min_decisions
        rate_p = shift = shift_p = None
        if testing and self.tested_rate is not None:
            # P(Binomial(n, u) >= k): bdtrc is the function behind scipy.stats.binom.sf, without its
            # argument checking (a few microseconds instead of 200, on the event loop)
            rate_p = 1.0 if k == 0 else float(bdtrc(k - 1, n, self.tested_rate))
        m = len(self.good)
        if testing and m:
            u = self._twice_u / 2
            shift = u / (n * m)
            sigma = math.sqrt(n * m * (n + m + 1) / 12.0)
            shift_p = float(ndtr(-(u - n * m / 2.0 - 0.5) / sigma))
        rate_alarm = rate_p is not None and rate_p < self.rate_level
        shift_alarm = shift_p is not None and shift_p < self.shift_level
        return DriftStatus(
            decisions=n, window=self.window, flagged=k, flag_rate=rate,
            expected_flag_rate=self.expected_rate, interval=self.interval, tested_flag_rate=self.tested_rate,
            flag_rate_p_value=rate_p, score_shift=shift, score_shift_p_value=shift_p,
            alarm=rate_alarm or shift_alarm, reason=self._reason(n, rate, rate_p, rate_alarm, shift, shift_p, shift_alarm),
            rate_level=self.rate_level, shift_level=self.shift_level,
        )

    def _reason(self, n, rate, rate_p, rate_alarm, shift, shift_p, shift_alarm) -> str:
        if n < self.min_decisions:
            return f"{n} decision{'s' if n != 1 else ''} so far: the drift watch tests from {self.min_decisions} on"
        if self.expected_rate is None:
            rate_text = f"flag rate {_percent(rate)} over the last {n} decisions (the model states no expected rate)"
        else:
            expected = f"the calibration's {_percent(self.expected_rate)}"
            if self.interval is not None:
                expected += f" ({INTERVAL_CONFIDENCE:.0%} interval {_percent(self.interval[0])}-{_percent(self.interval[1])})"
            relation = "above" if rate_alarm else "against"
            rate_text = f"flag rate {_percent(rate)} over the last {n} decisions, {relation} {expected}, p={rate_p:.2g}"
        if shift_p is None:
            shift_text = "score shift not available (the model stores no good-image scores: refit it with `patchcore fit`)"
        else:
            higher = "higher than" if shift_alarm else "against"
            shift_text = f"scores {higher} the calibration's good images: {shift:.0%} of pairs higher (50% expected), p={shift_p:.2g}"
        if rate_alarm and (shift_alarm or shift_p is None):
            return f"drift: {rate_text}; {shift_text}"
        if rate_alarm:
            return f"drift: {rate_text}"
        if shift_alarm:
            return f"drift: {shift_text} over the last {n} decisions"
        return f"no drift: {rate_text}; {shift_text}"


def _expected_rate(calibration: Calibration) -> tuple[float | None, tuple[float, float] | None]:
    """The calibration's expected flag rate and its interval; for a format-1 model (cut at the highest
    of m held-out scores) the rate that rule implies, 1 / (m + 1), and its Beta(1, m) interval."""
    expected, interval = calibration.expected_false_alarm_rate, calibration.false_alarm_interval
    if expected is not None and interval is not None:
        return float(expected), (float(interval[0]), float(interval[1]))
    count = calibration.num_images
    if expected is None and count >= 1 and calibration.false_alarm_rate is None:
        tail = (1.0 - INTERVAL_CONFIDENCE) / 2
        # the quantiles of Beta(1, m): betaincinv is what scipy.stats.beta.ppf computes
        return 1.0 / (count + 1), (float(betaincinv(1, count, tail)), float(betaincinv(1, count, 1 - tail)))
    return (None if expected is None else float(expected)), None


__all__ = ["DEFAULT_WINDOW", "DriftStatus", "DriftWatch"]
