"""Claims about tasks, with the task as the unit: summaries over tasks (means and medians, with
intervals from resampling the tasks), the tests behind RQ2-RQ4 (rank correlation, Kruskal-Wallis
and paired permutation tests over tasks, and a mixed model with the clinical group as a random
effect), and the multiplicity correction every family of tests goes through.

The common scale across tasks is the gap share (change.py): the effect in units of the
reference's margin over its trivial baseline, over the tasks where the reference is not at
chance. Rank tests weigh an extreme task as one rank. Nothing here is hand-written statistics:
scipy.stats (permutation_test, pearsonr on ranks = Spearman's rho, kruskal, iqr, bootstrap) and
statsmodels (mixedlm, multipletests) do the work.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict

import numpy as np
import scipy.stats

from m2dino.evaluation.bootstrap import BOOTSTRAP_SEED, DEFAULT_LEVEL, task_seed
from m2dino.evaluation.metrics import as_float, nanmean
from m2dino.evaluation.report.change import Change
from m2dino.paradigms import DEFAULT_CORRECTION  # noqa: F401 (re-exported; the choices are spelled there)

# --correction: statsmodels.stats.multitest.multipletests' method per choice
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "none": None}
CORRECTION_NAMES = {"holm": "Holm (family-wise error rate)", "bh": "Benjamini-Hochberg (false discovery rate)",
                    "none": "none"}
PERMUTATIONS = 9999           # random permutations of the tasks per permutation test
MIN_TASKS = 5                 # fewer tasks: no test over tasks
MIN_GROUPS_MIXED = 3          # the mixed model needs this many clinical groups


def adjust(p_values, correction: str, alpha: float = 1 - DEFAULT_LEVEL) -> list:
    """The p-values adjusted for multiplicity (statsmodels' multipletests); None stays None."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {sorted(CORRECTIONS)}, got {correction!r}")
    present = [i for i, p in enumerate(p_values) if p is not None and math.isfinite(p)]
    out = [None] * len(p_values)
    if not present:
        return out
    raw = np.asarray([p_values[i] for i in present], dtype=np.float64)
    if CORRECTIONS[correction] is None:
        adjusted = raw
    else:
        from statsmodels.stats.multitest import multipletests  # noqa: PLC0415 (statsmodels is slow to import)

        adjusted = multipletests(raw, alpha=alpha, method=CORRECTIONS[correction])[1]
    for i, p in zip(present, adjusted):
        out[i] = float(p)
    return out


# ------------------------------------------------------------------------------ summaries
def over_tasks(values, n_resamples: int, level: float, seed_key: str) -> dict | None:
    """Mean and median over tasks, each with a percentile bootstrap interval resampling the tasks
    (scipy.stats.bootstrap; none with fewer than three tasks or --bootstrap 0)."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return None
    out = {"mean": float(finite.mean()), "median": float(np.median(finite)), "ci_mean": None, "ci_median": None,
           "n_tasks": int(finite.size)}
    if finite.size >= 3 and n_resamples > 0:
        for name, statistic in (("ci_mean", np.mean), ("ci_median", np.median)):
            with warnings.catch_warnings():  # identical values: a degenerate (zero-width) interval
                warnings.simplefilter("ignore")
                result = scipy.stats.bootstrap((finite,), statistic, n_resamples=n_resamples, method="percentile",
                                               confidence_level=level, vectorized=True,
                                               rng=np.random.default_rng(task_seed(BOOTSTRAP_SEED, seed_key)))
            interval = result.confidence_interval
            out[name] = [float(interval.low), float(interval.high)]
    return out


def summarize(tasks: dict, changes: dict, at_chance: dict, paradigms: list[str], key_of, n_resamples: int,
              level: float, seed_key: str) -> dict:
    """{key: {paradigm: summary}} over the tasks that key_of(task) puts together.

    Every paradigm gets its mean metrics; a compared one (with a Change on the task) also: the
    mean and median gap share and relative change over the tasks not at chance (those at chance
    listed), the mean and median effect in the metric's units when the tasks share one primary
    metric (all tasks), and its counts of flags and of non-inferiority shown."""
    grouped = defaultdict(list)
    for task_id, task in tasks.items():
        grouped[key_of(task)].append(task_id)
    out = {}
    for key in sorted(grouped):
        out[key] = {}
        for paradigm in paradigms:
            members = [t for t in grouped[key] if paradigm in tasks[t]["paradigms"]]
            if not members:
                continue
            summary = {"n_tasks": len(members), "tasks": members,
                       "metrics": _mean_metrics([tasks[t]["paradigms"][paradigm]["metrics"] for t in members])}
            found = {t: changes[t][paradigm] for t in members if paradigm in changes.get(t, {})}
            if found:
                summary.update(_change_summary(found, at_chance, n_resamples, level, f"{seed_key}/{key}/{paradigm}"))
            out[key][paradigm] = summary
    return out


def _mean_metrics(metrics: list[dict]) -> dict:
    names = sorted({m for entry in metrics for m in entry})
    return {m: nanmean([as_float(entry.get(m)) for entry in metrics]) for m in names}


def _change_summary(changes: dict[str, Change], at_chance: dict, n_resamples: int, level: float, key: str) -> dict:
    relative_tasks = [t for t in changes if at_chance.get(t) is not True]
    by_metric = defaultdict(list)
    for t in relative_tasks:
        for name, value in changes[t].relative.items():
            by_metric[name].append(as_float(value))
    relative = over_tasks([changes[t].relative_primary for t in relative_tasks], n_resamples, level, f"{key}/rel")
    out = {
        "change_vs_ts": {m: nanmean(v) for m, v in sorted(by_metric.items())},
        "primary_change_vs_ts": relative["mean"] if relative else math.nan,
        "primary_change_ci": relative["ci_mean"] if relative else None,
        "relative_change": relative,
        "gap_share": over_tasks([changes[t].gap_share for t in changes], n_resamples, level, f"{key}/gap"),
        "at_chance_tasks": sorted(t for t in changes if at_chance.get(t) is True),
        "significant_gains": sum(c.transfer == "positive" for c in changes.values()),
        "significant_drops": sum(c.transfer == "negative" for c in changes.values()),
        "non_inferior": sum(c.non_inferior is True for c in changes.values()),
        "non_inferiority_tested": sum(c.non_inferior is not None for c in changes.values()),
    }
    out["negative_transfer_tasks"] = out["significant_drops"]
    metrics = {c.metric for c in changes.values()}
    if len(metrics) == 1:  # one metric: its units can be averaged
        units = over_tasks([c.units for c in changes.values()], n_resamples, level, f"{key}/units")
        out["effect_units"] = {"metric": metrics.pop(), **units} if units else None
    return out


def median_split(tasks: dict, changes: dict, paradigms: list[str]) -> dict:
    """The descriptive data-scarce vs data-rich table (no test: the claim about scale is RQ2's
    test over tasks): per paradigm, the mean and median gap share on each side and their
    differences; also the spread of the clinical-group medians (and AU's minus CG's; RQ4's claim
    is its own test over tasks)."""
    out = {}
    for paradigm in paradigms:
        sides, groups = defaultdict(list), defaultdict(list)
        for task_id, task in tasks.items():
            change = changes.get(task_id, {}).get(paradigm)
            if change is None or change.gap_share is None:
                continue
            sides[task["scale"]].append(change.gap_share)
            groups[task["group"]].append(change.gap_share)
        entry = {}
        if sides.get("data-scarce") and sides.get("data-rich"):
            scarce, rich = sides["data-scarce"], sides["data-rich"]
            entry["scarce_minus_rich"] = {
                "value": float(np.mean(scarce) - np.mean(rich)),
                "median_difference": float(np.median(scarce) - np.median(rich)),
                "ci": None, "descriptive": True, "n_tasks": {"data-scarce": len(scarce), "data-rich": len(rich)}}
        if len(groups) >= 2:
            entry["group_spread"] = {"value": float(np.std([np.median(v) for v in groups.values()])), "ci": None,
                                     "descriptive": True, "n_groups": len(groups)}
        out[paradigm] = entry
    spreads = [out.get(p, {}).get("group_spread") for p in ("au", "cg")]
    if all(spreads):
        out["au_minus_cg_spread"] = {"value": spreads[0]["value"] - spreads[1]["value"], "ci": None,
                                     "descriptive": True}
    return out


# ------------------------------------------------------------------------------ tests over tasks
def spearman_test(effect, covariate, seed_key: str) -> tuple[float, float]:
    """(Spearman's rho, two-sided permutation p): the tasks' effects permuted against the covariate
    (scipy.stats.permutation_test over Pearson's r of the ranks, which is Spearman's rho)."""
    x, y = scipy.stats.rankdata(effect), scipy.stats.rankdata(covariate)

    def rho(ranks, axis=-1):
        return scipy.stats.pearsonr(ranks, np.broadcast_to(y, ranks.shape), axis=axis).statistic

    with warnings.catch_warnings():  # a constant column: rho undefined (NaN)
        warnings.simplefilter("ignore")
        result = scipy.stats.permutation_test((x,), rho, permutation_type="pairings", vectorized=True,
                                              n_resamples=PERMUTATIONS, rng=_rng(seed_key))
    return float(result.statistic), _finite(result.pvalue)


def kruskal_test(samples: list, seed_key: str) -> tuple[float, float]:
    """(Kruskal-Wallis H, permutation p): the tasks' effects permuted across the task types."""
    def h(*groups, axis=-1):
        return scipy.stats.kruskal(*groups, axis=axis).statistic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = scipy.stats.permutation_test(tuple(np.asarray(s, dtype=np.float64) for s in samples), h,
                                              vectorized=True, n_resamples=PERMUTATIONS, alternative="greater",
                                              rng=_rng(seed_key))
    return float(result.statistic), _finite(result.pvalue)


def paired_spread_test(a, b, seed_key: str) -> tuple[float, float]:
    """(IQR(a) - IQR(b), two-sided p): the spread over tasks of two paradigms' effects on the same
    tasks, the paradigms swapped within tasks at random (a paired permutation test)."""
    def difference(x, y, axis=-1):
        return scipy.stats.iqr(x, axis=axis) - scipy.stats.iqr(y, axis=axis)

    result = scipy.stats.permutation_test((np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)),
                                          difference, permutation_type="samples", vectorized=True,
                                          n_resamples=PERMUTATIONS, rng=_rng(seed_key))
    return float(result.statistic), _finite(result.pvalue)


def mixed_model(rows: list[dict], paradigms: list[str]) -> dict:
    """Mixed models of the gap share on log(train size) + task type, clinical group as a random
    intercept, fitted by REML (statsmodels' mixedlm): one per paradigm (its slope; each paradigm
    keeps its own residual variance), and, for each pair of paradigms, the stacked model
    paradigm x log(train size) + task type with the task as a variance component (a task enters
    once per paradigm), whose interaction tests whether the slopes differ.
    Returns {"slopes": {paradigm: fit}, "differences": {(a, b): fit}}, each fit {"z", "p",
    "estimate", "converged", "n_groups"} or {"note": why it could not be fitted}."""
    out = {"slopes": {}, "differences": {}}
    for paradigm in paradigms:
        own = [r for r in rows if r["paradigm"] == paradigm]
        out["slopes"][paradigm] = _fit(own, "effect ~ log_n{types}", None, [("log_n", 1.0)])
    for i, a in enumerate(paradigms):
        for b in paradigms[i + 1:]:
            pair = [r for r in rows if r["paradigm"] in (a, b)]
            out["differences"][(a, b)] = _fit(pair, "effect ~ 0 + C(paradigm) + C(paradigm):log_n{types}",
                                              {"task": "0 + C(task)"},
                                              [(f"C(paradigm)[{a}]:log_n", 1.0), (f"C(paradigm)[{b}]:log_n", -1.0)])
    return out


def _fit(rows: list[dict], formula: str, variance_components, contrast: list[tuple[str, float]]) -> dict:
    """One REML fit and the Wald test of a contrast of its fixed effects."""
    import pandas as pd  # noqa: PLC0415 (statsmodels' dependency; slow to import)
    import statsmodels.formula.api as smf  # noqa: PLC0415

    frame = pd.DataFrame(rows)
    if frame.empty or len(frame["task"].unique()) < MIN_TASKS:
        return {"note": f"fewer than {MIN_TASKS} tasks"}
    n_groups = int(frame["group"].nunique())
    if n_groups < MIN_GROUPS_MIXED:
        return {"note": f"{n_groups} clinical group(s): the random effect needs at least {MIN_GROUPS_MIXED}"}
    formula = formula.format(types=" + C(task_type)" if frame["task_type"].nunique() > 1 else "")
    try:
        with warnings.catch_warnings():  # convergence warnings: `converged` says it
            warnings.simplefilter("ignore")
            model = smf.mixedlm(formula, frame, groups="group", vc_formula=variance_components)
            fit = model.fit(reml=True)
            names = list(model.exog_names)
            weights = np.zeros((1, len(names)))  # over the fixed effects
            for name, weight in contrast:
                weights[0, names.index(name)] = weight
            test = fit.t_test(weights)
    except (ValueError, np.linalg.LinAlgError) as error:
        return {"note": f"the mixed model could not be fitted: {error}"}
    return {"z": _finite(np.asarray(test.tvalue).item()), "p": _finite(np.asarray(test.pvalue).item()),
            "estimate": float(np.asarray(test.effect).item()), "converged": bool(fit.converged), "n_groups": n_groups}


def task_level_tests(tasks: dict, changes: dict, paradigms: list[str], reference: str) -> list[dict]:
    """Every test over tasks that an answer rests on (RQ2 scale, RQ3 type, RQ4 stability), one
    entry each: {"question", "test", "paradigm", "reference", "statistic", "p", "n_tasks",
    "method", ...}; p None where the test could not be made (the entry says why)."""
    group_size = defaultdict(int)
    for task in tasks.values():
        group_size[task["group"]] += int(task["train_size"])
    effects = {p: {t: changes[t][p].gap_share for t in tasks
                   if p in changes.get(t, {}) and changes[t][p].gap_share is not None
                   and math.isfinite(changes[t][p].gap_share)} for p in paradigms}
    entries = []

    def add(question, test, paradigm, statistic, p, n, method, **extra):
        entries.append({"question": question, "test": test, "paradigm": paradigm, "reference": reference,
                        "statistic": statistic, "p": p, "n_tasks": n, "method": method, **extra})

    permutation = f"scipy.stats.permutation_test, {PERMUTATIONS} random permutations of the tasks"
    covariates = {
        "spearman_log_train_size": lambda t: math.log(max(1, tasks[t]["train_size"])),
        "spearman_log_group_size": lambda t: math.log(max(1, group_size[tasks[t]["group"]])),
        "spearman_share_of_group": lambda t: tasks[t]["train_size"] / max(1, group_size[tasks[t]["group"]]),
    }
    for paradigm in paradigms:
        ids = sorted(effects[paradigm])
        for test, covariate in covariates.items():
            if len(ids) < MIN_TASKS:
                add("RQ2", test, paradigm, None, None, len(ids), permutation, note=f"fewer than {MIN_TASKS} tasks")
                continue
            rho, p = spearman_test([effects[paradigm][t] for t in ids], [covariate(t) for t in ids],
                                   f"{reference}/{paradigm}/{test}")
            add("RQ2", test, paradigm, rho, p, len(ids), f"Spearman's rho, {permutation}")
    entries += _mixed_entries(tasks, effects, paradigms, reference)
    for paradigm in paradigms:
        by_type = defaultdict(list)
        for t, value in effects[paradigm].items():
            by_type[tasks[t]["task_type"]].append(value)
        samples = {k: v for k, v in sorted(by_type.items()) if len(v) >= 2}
        n = sum(len(v) for v in samples.values())
        if len(samples) < 2:
            add("RQ3", "kruskal_task_type", paradigm, None, None, n, permutation,
                note="fewer than two task types with two tasks")
            continue
        h, p = kruskal_test(list(samples.values()), f"{reference}/{paradigm}/kruskal")
        add("RQ3", "kruskal_task_type", paradigm, h, p, n, f"Kruskal-Wallis H, {permutation} across the types",
            medians={k: float(np.median(v)) for k, v in samples.items()})
    if "au" in paradigms and "cg" in paradigms:
        both = sorted(set(effects["au"]) & set(effects["cg"]))
        au, cg = [effects["au"][t] for t in both], [effects["cg"][t] for t in both]
        method = f"paired permutation test over tasks (AU and CG swapped within tasks), {PERMUTATIONS} permutations"
        if len(both) < MIN_TASKS:
            add("RQ4", "paired_permutation_iqr", "au-cg", None, None, len(both), method,
                note=f"fewer than {MIN_TASKS} tasks")
        else:
            difference, p = paired_spread_test(au, cg, f"{reference}/iqr")
            add("RQ4", "paired_permutation_iqr", "au-cg", difference, p, len(both), method,
                iqr={"au": float(scipy.stats.iqr(au)), "cg": float(scipy.stats.iqr(cg))})
    return entries


def _mixed_entries(tasks: dict, effects: dict, paradigms: list[str], reference: str) -> list[dict]:
    rows = [{"effect": value, "paradigm": p, "task": t, "log_n": math.log(max(1, tasks[t]["train_size"])),
             "task_type": tasks[t]["task_type"], "group": tasks[t]["group"]}
            for p in paradigms for t, value in effects[p].items()]
    fits = mixed_model(rows, paradigms)
    method = ("statsmodels mixedlm (REML): gap share ~ log(train size) + task type, clinical group as a random "
              "intercept; Wald z")
    entries = []
    for paradigm, fit in fits["slopes"].items():
        entries.append(_mixed_entry("mixedlm_log_train_size", paradigm, reference, fit, len(effects[paradigm]),
                                    method, "slope"))
    for (a, b), fit in fits["differences"].items():
        n = len(set(effects[a]) | set(effects[b]))
        entries.append(_mixed_entry("mixedlm_slope_difference", f"{a}-{b}", reference, fit, n,
                                    method.replace("gap share ~", "gap share ~ paradigm x") + ", task as a variance "
                                    "component", "slope_difference"))
    return entries


def _mixed_entry(test: str, paradigm: str, reference: str, fit: dict, n_tasks: int, method: str, name: str) -> dict:
    entry = {"question": "RQ2", "test": test, "paradigm": paradigm, "reference": reference,
             "statistic": fit.get("z"), "p": fit.get("p"), "n_tasks": n_tasks, "method": method}
    if "note" in fit:
        entry["note"] = fit["note"]
    else:
        entry.update({name: fit["estimate"], "converged": fit["converged"], "n_groups": fit["n_groups"]})
    return entry


def find_test(entries: list[dict], question: str, test: str, paradigm: str) -> dict | None:
    return next((e for e in entries if e["question"] == question and e["test"] == test
                 and e["paradigm"] == paradigm), None)


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(task_seed(BOOTSTRAP_SEED, key))


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
