"""The study's vocabulary: its paradigms, their labels and order, the training-length control,
and the plateau rule. Every layer (training, evaluation, the report) imports these names from
here, so a paradigm or a constant is spelled once.

Paradigms (the question a user asks: which tasks should share a model?):
- `ts`: one model per task (task-specific);
- `cg`: one model per clinical group;
- `au`: one model for all tasks (all-in-one);
- `ts_converged` (the control, `--control ts-converged`): the TS models again, each trained
  until its loss on an inner split of its training rows plateaus (the converged budget's TS
  part); the report's second reference, TS*.
- `ag` (`--paradigm ag`, or `--paradigm all --with-ag`): one model per affinity group, the groups
  chosen from inter-task affinity measured early in AU training (m2dino.training.ag); trained
  like CG.
- `random_1`..`random_N` (`--random-groupings N`): random partitions of the tasks with AG's group
  sizes, trained like CG: the null of "AG beats chance", not a paradigm of the report's tables.
"""
from __future__ import annotations

# The study's paradigms, in the report's order (TS, the reference, first)
PARADIGMS = ("ts", "cg", "au")
# --control ts-converged adds this paradigm: the TS models trained until their inner-split loss plateaus
CONTROL_PARADIGM = "ts_converged"
CONTROLS = ("none", "ts-converged")
# One model per affinity group (groups from the AU model's early inter-task affinity)
AG_PARADIGM = "ag"
# --random-groupings N trains random_1..random_N: random partitions with AG's group sizes (AG's null)
RANDOM_PREFIX = "random_"
# AG's affinity probe (m2dino.training.ag): when AG is asked and --affinity-steps is 0, the study's
# AU model measures this many steps (every 10th of its first); without an AU model (--paradigm ag
# alone), or from `python -m m2dino.affinity`, the AU model's first AFFINITY_PROBE_STEPS steps are
# trained and each measured (docs/study.md: the measured cost)
AU_PROBE_STEPS = 10
AFFINITY_PROBE_STEPS = 12
# The affinity that chooses groups, and the files a grouping is written to (the probe command's
# --out, and OUT/ag/ of a study)
GROUPING_MEASURE = "lookahead"
GROUPS_FILE = "groups.yaml"
GROUPING_FILE = "grouping.json"
# What each paradigm trains, in words (the command line's help)
PARADIGM_MEANINGS = {"ts": "one model per task", "cg": "one per clinical group", "au": "one for all",
                     AG_PARADIGM: "one per affinity group"}
# How the report and the plots name each paradigm
PARADIGM_LABELS = {"ts": "TS", "cg": "CG", "au": "AU", CONTROL_PARADIGM: "TS*", AG_PARADIGM: "AG"}

# --budget: how long each model trains. equal-exposure: --epochs over each model's own data (every
# sample seen as often in every paradigm); converged: every model (TS, CG, AU alike) until its loss
# on an inner split of its own training rows plateaus, or a cap (the plateau rule below)
BUDGETS = ("equal-exposure", "converged")
# --correction: the multiplicity correction over the report's tests (Holm, Benjamini-Hochberg, none)
CORRECTIONS = ("holm", "bh", "none")
DEFAULT_CORRECTION = "bh"

# The plateau rule of a converged model (--budget converged, and the TS* control). The inner split:
# INNER_FRACTION of each task's training rows (at least one; none of a task with a single row), the
# same rows in every paradigm and seed (drawn from the split seed and the task id), held out of
# training; the reported validation images are never used. At the end of every epoch, once a model
# has trained at least its equal-exposure steps, its mean loss on the inner split is measured; it has
# plateaued when the mean of the last PLATEAU_WINDOW measurements improved on the mean of the
# PLATEAU_WINDOW before by less than PLATEAU_REL_TOL (relative). The schedule then decays
# (warmup-stable-decay, m2dino.training.schedule) over WSD_DECAY_FRACTION of the model's total steps
# and stops; without a plateau the decay is the last WSD_DECAY_FRACTION of the cap, PLATEAU_CAP_FACTOR
# times the equal-exposure steps.
INNER_FRACTION = 0.1
PLATEAU_WINDOW = 3
PLATEAU_REL_TOL = 0.01
PLATEAU_CAP_FACTOR = 5
WSD_DECAY_FRACTION = 0.2


def label(paradigm: str) -> str:
    """The paradigm's name in the report (TS, CG, AU, TS*); an unknown one as it is spelled."""
    return PARADIGM_LABELS.get(paradigm, paradigm)


def random_grouping(index: int) -> str:
    """The paradigm name of the index-th random grouping (from 1): random_1, random_2, ..."""
    return f"{RANDOM_PREFIX}{index}"


def random_grouping_index(paradigm: str) -> int | None:
    """The index of a --random-groupings paradigm (random_3 -> 3); None for any other paradigm."""
    rest = paradigm[len(RANDOM_PREFIX):] if paradigm.startswith(RANDOM_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def is_random_grouping(paradigm: str) -> bool:
    """Whether a paradigm is one of --random-groupings' random partitions (AG's null)."""
    return random_grouping_index(paradigm) is not None


def trains_ag(study) -> bool:
    """Whether a study (its config, or its StudyOptions section) trains AG: --paradigm ag, or
    --paradigm all --with-ag."""
    return study.paradigm == AG_PARADIGM or (study.paradigm == "all" and study.with_ag)


def plateau_rule_text() -> str:
    """The plateau rule in words, for help texts and the report."""
    return (f"loss on an inner split ({INNER_FRACTION:.0%} of each task's training rows, held out of training, "
            f"fixed by the split seed; never the validation images) measured at epoch ends from its "
            f"equal exposure steps on; plateau: the mean of the last {PLATEAU_WINDOW} measurements < "
            f"{PLATEAU_REL_TOL:.0%} below the {PLATEAU_WINDOW} before; then the learning rate decays linearly to 0 "
            f"over {WSD_DECAY_FRACTION:.0%} of the model's steps (WSD: warmup, stable, decay) and training stops; "
            f"cap {PLATEAU_CAP_FACTOR}x the equal exposure steps, its last {WSD_DECAY_FRACTION:.0%} the decay")
