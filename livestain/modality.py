"""Brightfield or phase contrast? Told from the transmitted-light stack alone.

A model trained on brightfield predicts phase-contrast stacks badly (the bundled model:
DNA r 0.38, `bench/robustness.py`) and a phase-contrast model loses brightfield, so the
worker picks the model made for what the camera shows. The two look different through
focus, on two counts (`livestain.focus.halo_profile` for the first):

- **Brightfield**: a weak phase object's image is its phase's Laplacian times the
  defocus, so the stack's main pattern changes sign at the focal plane (dark halos on
  one side, bright on the other). Where the cells lie beyond the stack's end and the
  sign does not change, the sharpest plane's intensities are about symmetric.
- **Zernike phase contrast**: the ring turns phase into intensity directly, so the
  pattern keeps its sign through focus, strongest at it, and the sharpest plane is a
  dim background with bright halos and bright detail: a long bright tail.

So a stack is phase contrast when its pattern keeps its sign and its sharpest plane's
intensities are skewed bright (`PHASE_MIN_SKEW`). Measured on randomized simulated
fields (`bench/modality.py`): no brightfield field of 93 was taken for phase
contrast, and 51 of 107 phase-contrast fields were recognised (every one at the
robustness bench's phase condition; the rest keep the brightfield model, as before). When unsure (no pattern: an
empty field, noise) it answers brightfield, the bundled model's own modality, so a
stack is never moved to the phase model on a guess.

Numpy and scipy only, like `livestain.focus`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from livestain.focus import (FOCUS_DIP_RATIO, MIN_FOCUS_PLANES, MIN_HALO_SHARE, _crops, focus_dip, halo_profile,
                             plane_contrast)

BRIGHTFIELD = "brightfield"
PHASE = "phase"
MODALITIES = (BRIGHTFIELD, PHASE)

#: The sharpest plane's intensity skewness above which a stack whose halo pattern keeps
#: its sign is phase contrast. Measured on 200 randomized fields (128 px, seed 11):
#: phase contrast -0.9..6.2 (median 1.5), brightfield whose pattern keeps its sign
#: -1.44..+1.30 (one field above 0.56); a real brightfield stack 1.3. Set above them
#: all: a brightfield stack given the phase model is predicted far worse than a phase
#: stack given the brightfield model, which is what happened before routing.
PHASE_MIN_SKEW = 1.5
#: Stacks shallower than this are taken as brightfield: through so little defocus the
#: halos of neither modality change (a real brightfield stack 2 um deep, 100 nm steps,
#: kept its sign and was bright-tailed). Randomized fields span 6-40 um.
MIN_SPAN_UM = 5.0
#: The pattern "changes sign" when its profile reaches this far below zero on the side
#: opposite its peak (profile scaled to +-1): brightfield through focus 0.23-0.99,
#: phase contrast <= 0.00.
SIGN_CHANGE = 0.1


@dataclass(frozen=True)
class ModalityEstimate:
    """What a stack looks like, and the figures that said so.

    Attributes
    ----------
    modality : str
        ``"brightfield"`` or ``"phase"``.
    sign_change : float
        How far the halo profile goes against its peak's sign (>= `SIGN_CHANGE`: it
        changes sign, as brightfield does through focus).
    skew : float
        Intensity skewness of the plane that shows the halo pattern most (the sharpest
        plane, near enough; bright-tailed > 0).
    share : float
        The halo pattern's share of the stack's detail (`halo_profile`).
    reason : str
        One line, in a microscopist's words.
    """

    modality: str
    sign_change: float
    skew: float
    share: float
    reason: str

    def to_dict(self) -> dict[str, float | str]:
        return {"modality": self.modality, "modality_reason": self.reason,
                "modality_skew": round(self.skew, 3), "modality_sign_change": round(self.sign_change, 3)}


def _skewness(plane: np.ndarray) -> float:
    """Intensity skewness over `livestain.focus._crops` (the same pixels as the contrast)."""
    x = np.concatenate([c.astype(np.float64).ravel() for c in _crops(plane)])
    x -= x.mean()
    sd = float(x.std())
    return float((x**3).mean() / sd**3) if sd > 0 else 0.0


def detect_modality(stack: np.ndarray, z_step_um: float | None = None,
                    contrast: np.ndarray | None = None) -> ModalityEstimate:
    """Brightfield or phase contrast, for a (z, y, x) transmitted-light stack with planes
    ``z_step_um`` apart (None: unknown, taken as 1 um; see the module docstring).
    Brightfield when in doubt.

    A contrast minimum inside the stack (`livestain.focus.estimate_focus`'s dip) is
    brightfield at once: none of 80 randomized phase-contrast fields had one, and the
    worker needs ``contrast`` (`plane_contrast`) for its z window anyway, so an in-focus
    brightfield stack costs the routing nothing more (the halo pattern: ~60 ms per
    16 x 256 x 256 stack on 2 CPU cores)."""
    stack = np.asarray(stack)
    if stack.ndim != 3 or stack.shape[0] < MIN_FOCUS_PLANES:
        return ModalityEstimate(BRIGHTFIELD, 0.0, 0.0, 0.0,
                                f"too few planes to tell ({stack.shape[0] if stack.ndim == 3 else 0}); "
                                f"taken as brightfield")
    span = (stack.shape[0] - 1) * (1.0 if z_step_um is None else float(z_step_um))
    if span < MIN_SPAN_UM:
        return ModalityEstimate(BRIGHTFIELD, 0.0, 0.0, 0.0,
                                f"the stack spans {span:.1f} um, too little defocus to tell (needs "
                                f"{MIN_SPAN_UM:g} um); taken as brightfield")
    dip = focus_dip(plane_contrast(stack)[0] if contrast is None else contrast)
    if dip < FOCUS_DIP_RATIO:
        return ModalityEstimate(BRIGHTFIELD, 1.0, 0.0, 0.0,
                                f"the contrast dips at focus inside the stack ({dip:.2f}): brightfield")
    profile, share = halo_profile(stack)
    if share < MIN_HALO_SHARE:
        return ModalityEstimate(BRIGHTFIELD, 0.0, 0.0, share,
                                f"no pattern through focus ({share:.0%} of the detail): taken as brightfield")
    peak = int(np.argmax(np.abs(profile)))
    aligned = profile * np.sign(profile[peak])
    sign_change = float(-aligned.min())
    skew = _skewness(stack[peak])  # the plane that shows the pattern most: the sharpest, near enough
    if sign_change >= SIGN_CHANGE:
        return ModalityEstimate(BRIGHTFIELD, sign_change, skew, share,
                                "the halos reverse through focus: brightfield")
    if skew >= PHASE_MIN_SKEW:
        return ModalityEstimate(PHASE, sign_change, skew, share,
                                f"the halos keep their sign through focus and the sharpest plane is "
                                f"bright-tailed (skewness {skew:.1f}): phase contrast")
    return ModalityEstimate(BRIGHTFIELD, sign_change, skew, share,
                            f"the halos keep their sign (cells beyond the stack?) and the sharpest plane "
                            f"is not bright-tailed (skewness {skew:.1f} < {PHASE_MIN_SKEW}): brightfield")
