"""Defective images hidden among the good ones: found from the scores a fit computes anyway, and
kept out of the memory bank and the calibration.

A folder of good images sorted on a line always holds a few bad parts. PatchCore takes every
training patch as normal, and the thresholds are cut on every training image's leave-one-out
score (``calibrate.py``), so a few defective images put the cut among defects. Those same scores
point at them: a training image scored without its own bank entries is scored like a new part,
and a defective one scores like a defect.

The rule, on the leave-one-out scores s of the n images a fit calibrates on::

    z = (log s - median(log s)) / (1.4826 * MAD(log s))     robust z: median and MAD ignore
                                                            up to half of the images being odd
    auto:      set aside every image with z > AUTO_Z_LIMIT (none with fewer than 10 images)
    FRACTION:  set aside the round(FRACTION * n) highest-scoring images (the share stated)
    off:       set aside none (the fit of patchcore 0.4 and before)

Logs, because good scores are skewed to the right and their logs are nearly symmetric. The
limit was chosen by measurement (``benchmarks/contamination.py``, docs/contamination.md): on
the clean training folders of cookies and battery_weld no image passes it, on bottle's one
(132.png, at 5.7), and on bottle with defective images added, they stand far above it.

A set-aside image is then left out of the model: its patches are taken out of the coreset and
the coreset's cover repaired (``coreset.repair_coreset``), and the others are scored leave-one-out
again for the thresholds. Images a person has reviewed as good (``trusted``) are never set aside,
only listed. Needs no PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

#: robust z of a leave-one-out log-score above which ``auto`` sets an image aside
AUTO_Z_LIMIT = 5.0
#: what ``--contamination`` takes unless told
DEFAULT_CONTAMINATION = "auto"
#: fewer training images than this give no median and MAD to judge by: ``auto`` sets none aside
MIN_IMAGES_FOR_AUTO = 10
#: a stated share above this is refused: the robust statistics hold while most images are good
MAX_FRACTION = 0.5
#: 1.4826 * MAD estimates the standard deviation of normally distributed values
MAD_TO_SD = 1.4826


def parse_contamination(value: str | float) -> str | float:
    """``auto``, ``off``, or a share of the training images in (0, 0.5]; anything else raises one line."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "off"):
        return value.strip().lower()
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"contamination must be auto, off or a share of the training images such as 0.1, got {value!r}") from None
    if not 0.0 < share <= MAX_FRACTION or not math.isfinite(share):
        raise ValueError(f"contamination share must be above 0 and at most {MAX_FRACTION} (e.g. 0.1 for 10%), got {value!r}")
    return share


def robust_z(scores: np.ndarray) -> np.ndarray:
    """Each score's distance above the median of the log-scores, in robust standard deviations."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = scores[scores > 0]
    if positive.size < 3:
        return np.zeros_like(scores)
    # A twin in the folder scores 0; keep the log finite, far below every other score.
    logs = np.log(np.maximum(scores, 1e-3 * float(np.min(positive))))
    middle = float(np.median(logs))
    spread = MAD_TO_SD * float(np.median(np.abs(logs - middle)))
    if spread <= 1e-12:  # most images score alike: no scale to measure an outlier by
        return np.zeros_like(scores)
    return (logs - middle) / spread


@dataclass(frozen=True)
class Suspect:
    """A training image whose leave-one-out score stands out from the others'."""

    path: str
    score: float  # its leave-one-out score when it was found (raw distance units)
    z: float  # robust z of its log-score among the images checked
    reason: str
    set_aside: bool  # False: reviewed as good, so only listed


@dataclass(frozen=True)
class ContaminationCheck:
    """What a fit found among its training images, and did with them."""

    setting: str  # "auto", "off", or the share stated, as text
    rule: str
    num_checked: int
    suspects: tuple[Suspect, ...] = ()

    @property
    def set_aside(self) -> list[Suspect]:
        return [suspect for suspect in self.suspects if suspect.set_aside]

    @property
    def set_aside_paths(self) -> list[str]:
        return [suspect.path for suspect in self.set_aside]

    def describe(self) -> str:
        """One line for the fit's output."""
        if self.setting == "off":
            return "contamination check off: every training image is in the model"
        listed = len(self.suspects) - len(self.set_aside)
        kept = f"; {listed} reviewed as good stand out too, kept and listed" if listed else ""
        return f"set aside {len(self.set_aside)} of {self.num_checked} training images as likely defective ({self.rule}){kept}"

    def joined(self, later: "ContaminationCheck") -> "ContaminationCheck":
        """This check and a later one (an update's), as one: the later setting and rule, every suspect."""
        return ContaminationCheck(later.setting, later.rule, self.num_checked + later.num_checked, self.suspects + later.suspects)

    def to_dict(self) -> dict[str, Any]:
        return {"setting": self.setting, "rule": self.rule, "num_checked": self.num_checked, "suspects": [asdict(s) for s in self.suspects]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ContaminationCheck":
        suspects = tuple(Suspect(**suspect) for suspect in values.get("suspects", ()))
        return cls(str(values["setting"]), str(values["rule"]), int(values["num_checked"]), suspects)


def check_training_images(
    scores: np.ndarray, sources: Sequence[str], setting: str | float, trusted: Iterable[str] = (), reference: np.ndarray | None = None
) -> ContaminationCheck:
    """Which training images to set aside, from their leave-one-out ``scores`` (one per source).

    ``trusted``: paths reviewed as good, listed but never set aside. ``reference``: good scores
    of images checked before (an update's earlier images), which join the median and MAD but are
    not candidates.
    """
    setting = parse_contamination(setting)
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(sources):
        raise ValueError(f"{len(scores)} scores for {len(sources)} images")
    if setting == "off":
        return ContaminationCheck("off", "off", len(scores))
    earlier = np.asarray(reference if reference is not None else (), dtype=np.float64)
    if setting == "auto" and len(earlier) + len(scores) < MIN_IMAGES_FOR_AUTO:
        return ContaminationCheck("auto", f"none: fewer than {MIN_IMAGES_FOR_AUTO} images to judge by", len(scores))
    z = robust_z(np.concatenate([earlier, scores]))[len(earlier) :]
    if setting == "auto":
        rule = f"robust z of the log leave-one-out score above {AUTO_Z_LIMIT:g}"
        chosen = [i for i in np.argsort(-z, kind="stable") if z[i] > AUTO_Z_LIMIT]
        reasons = {i: f"leave-one-out score {scores[i]:.4g}, robust z {z[i]:.1f} > {AUTO_Z_LIMIT:g}" for i in chosen}
    else:
        count = round(setting * len(scores))
        rule = f"the {count} highest leave-one-out scores (contamination {setting:g})"
        chosen = list(np.argsort(-scores, kind="stable")[:count])
        reasons = {i: f"leave-one-out score {scores[i]:.4g} among the highest {setting:.0%}" for i in chosen}
    trusted = {str(path) for path in trusted}
    room = len(earlier) + len(scores) - 2  # never all of them: a fit calibrates on two images at least
    suspects = []
    for i in chosen:
        reason = reasons[i]
        if str(sources[i]) in trusted:
            reason += "; reviewed as good, so kept"
        elif room <= 0:
            reason += "; kept: a fit needs two images"
        room -= reason == reasons[i]
        suspects.append(Suspect(str(sources[i]), float(scores[i]), float(z[i]), reason, set_aside=reason == reasons[i]))
    return ContaminationCheck(str(setting), rule, len(scores), tuple(suspects))
