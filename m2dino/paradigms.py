"""The study's vocabulary: its paradigms, their labels and order, the training-length control,
and the plateau rule. Every layer (training, evaluation, the report) imports these names from
here, so a paradigm or a constant is spelled once.

Paradigms (the question a user asks: which tasks should share a model?):
- `ts`: one model per task (task-specific);
- `cg`: one model per clinical group;
- `au`: one model for all tasks (all-in-one);
- `ts_converged` (the control, `--control ts-converged`): the TS models again, each trained
  until its training loss plateaus; the report's second reference, TS*.
"""
from __future__ import annotations

# The study's paradigms, in the report's order (TS, the reference, first)
PARADIGMS = ("ts", "cg", "au")
# --control ts-converged adds this paradigm: the TS models trained until their training loss plateaus
CONTROL_PARADIGM = "ts_converged"
CONTROLS = ("none", "ts-converged")
# What each paradigm trains, in words (the command line's help)
PARADIGM_MEANINGS = {"ts": "one model per task", "cg": "one per clinical group", "au": "one for all"}
# How the report and the plots name each paradigm
PARADIGM_LABELS = {"ts": "TS", "cg": "CG", "au": "AU", CONTROL_PARADIGM: "TS*"}

# The plateau rule of the converged-TS control, on training loss only: at the end of every epoch,
# once a model has trained at least its equal-exposure steps, it stops when the mean training loss
# of the last PLATEAU_WINDOW steps improved on the mean of the PLATEAU_WINDOW steps before by less
# than PLATEAU_REL_TOL (relative); otherwise it trains on up to PLATEAU_CAP_FACTOR times its
# equal-exposure steps (whole epochs).
PLATEAU_WINDOW = 20
PLATEAU_REL_TOL = 0.01
PLATEAU_CAP_FACTOR = 5


def label(paradigm: str) -> str:
    """The paradigm's name in the report (TS, CG, AU, TS*); an unknown one as it is spelled."""
    return PARADIGM_LABELS.get(paradigm, paradigm)


def plateau_rule_text() -> str:
    """The plateau rule in words, for help texts and the report."""
    return (f"mean of the last {PLATEAU_WINDOW} steps' training loss < {PLATEAU_REL_TOL:.0%} below the "
            f"{PLATEAU_WINDOW} before, checked at epoch ends from its equal-exposure steps on; cap "
            f"{PLATEAU_CAP_FACTOR}x those steps")
