"""The transfer design is what the generator does: every label reads exactly the factors
design.json declares, a shared factor drives both labels of a positive pair, the conflict's
two labels disagree on the same images while each task's images show the cue the other
reads and one task's training images carry the other's cue as a shortcut, groups differ in
acquisition, and design.json ships with the suite and reads back."""
import json
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from scipy import ndimage, stats
from scipy.spatial import ConvexHull
from sklearn.metrics import mutual_info_score

from m2dino.data.synthetic import (
    ACQUISITIONS,
    DESIGN_FILE,
    FAMILIES,
    RECIPES,
    draw,
    find_design,
    load_design,
    transfer_design,
    write_suite,
)
from m2dino.data.synthetic.canvas import Canvas, new_scene, render
from m2dino.data.synthetic.design import CONFLICTS
from m2dino.data.synthetic.scenes import POSTERIOR
from m2dino.tasks import TASKS, load_groups

SIZE = (112, 128)
FACTOR_TASKS = [t for t, r in RECIPES.items() if not r.identifies]


def same(a: dict, b: dict) -> bool:
    """Two annotations are the same label."""
    (kind, x), (_, y) = next(iter(a.items())), next(iter(b.items()))
    if kind == "mask":
        return np.array_equal(x, y)
    if kind == "label":
        return x == y
    return np.allclose(np.asarray(x, float), np.asarray(y, float))


def varied(task: str, seed: int, factor: str, size=(80, 96)):
    """(example, the same example with `factor` redrawn): the canvas, the other factors and the
    nuisance's seed held."""
    base = draw(task, np.random.default_rng([seed, 0]), size)
    other = draw(task, np.random.default_rng([seed, 1]), size)
    changed = draw(task, np.random.default_rng([seed, 0]), size, given={**base.factors, factor: other.factors[factor]})
    return base, changed


@pytest.mark.parametrize("task", FACTOR_TASKS)
def test_every_label_reads_exactly_the_declared_factors(task):
    """Redrawing a factor the label reads changes the label on some images; redrawing one it
    does not read changes the image (the factor is shown) but never the label."""
    recipe = RECIPES[task]
    assert set(recipe.reads) <= set(recipe.shows)
    for factor in recipe.shows:
        changes = shown = 0
        for seed in range(12):  # a redrawn factor may by chance equal the first (a class of 2 or 3)
            base, changed = varied(task, seed, factor)
            shown += not np.array_equal(base.image, changed.image)
            changes += not same(base.annotation, changed.annotation)
        assert shown >= 3, f"{task}'s images should show {factor}: they changed on {shown}/12"
        if factor in recipe.reads:
            assert changes >= 3, f"{task} should read {factor}, its label changed on {changes}/12 images"
        else:
            assert changes == 0, f"{task} should ignore {factor}, its label changed on {changes}/12 images"


def test_a_drawn_example_is_its_factors_label():
    """Drawing again from an example's factors gives the same image and label (the factors are
    the whole latent state; the nuisance is the seed's)."""
    for task in ("breast_3cls", "IUGC", "thyroid_nodule_det", "lung_disease_3cls"):
        ex = draw(task, np.random.default_rng(3), SIZE)
        again = draw(task, np.random.default_rng(3), SIZE, given=ex.factors)
        assert np.array_equal(ex.image, again.image) and same(ex.annotation, again.annotation)


# ----------------------------------------------------------------- positive: a shared factor drives both labels


def solidity(mask) -> float:
    ys, xs = np.nonzero(mask)
    return len(xs) / ConvexHull(np.stack([xs, ys], 1).astype(float)).volume


def test_thyroid_det_is_the_box_of_the_nodule_mask():
    for seed in range(10):
        seg = draw("thyroid_nodule", np.random.default_rng(seed), SIZE)
        det = draw("thyroid_nodule_det", np.random.default_rng(seed), SIZE, given=seg.factors)
        ys, xs = np.nonzero(seg.annotation["mask"])
        assert det.annotation["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_the_fetal_skull_is_one_factor_across_the_brain_plane_and_the_intrapartum_view():
    """The same skull factor draws the same head in fetal_head and head_symphysis_multi (less
    the symphysis drawn over it), and IUGC's tangent point lies on that head's outline."""
    for seed in range(6):
        labour = draw("head_symphysis_multi", np.random.default_rng(seed), SIZE)
        skull = {"fetal_skull": labour.factors["fetal_skull"]}
        brain = draw("fetal_head", np.random.default_rng(seed), SIZE, given=skull)
        head, sym = labour.annotation["mask"] == 2, labour.annotation["mask"] == 1
        assert np.array_equal(head, (brain.annotation["mask"] == 1) & ~sym)
        iugc = draw("IUGC", np.random.default_rng(seed), SIZE, given=labour.factors)
        x, y = iugc.annotation["points"][2]
        outline = head ^ ndimage.binary_erosion(head)
        ys, xs = np.nonzero(outline)
        assert np.min(np.hypot(xs + 0.5 - x, ys + 0.5 - y)) < 1e-6
        near = ndimage.binary_dilation(sym, iterations=2)
        for x, y in iugc.annotation["points"][:2]:  # the symphysis ends: its axis ends (where in the field)
            assert near[int(y), int(x)] or not iugc.canvas.contains(x, y)


def test_the_cervix_tasks_read_one_cervix():
    for seed in range(6):
        body = draw("cervix", np.random.default_rng(seed), SIZE)
        lips = draw("cervix_multi", np.random.default_rng(seed), SIZE, given=body.factors)
        ends = draw("FUGC", np.random.default_rng(seed), SIZE, given=body.factors)
        cervix, parts = body.annotation["mask"] == 1, lips.annotation["mask"] > 0
        assert (parts <= cervix).all() and parts.sum() > 0.8 * cervix.sum()  # the lips fill it but the canal
        grown = ndimage.binary_dilation(cervix, iterations=2)
        for x, y in ends.annotation["points"]:
            assert grown[int(y), int(x)]


def test_the_breast_margin_shapes_the_mask():
    """breast_lesion reads the margin: on the same lesions the mask's solidity alone tells
    circumscribed from spiculated."""
    solid, kinds = [], []
    for seed in range(40):
        seg = draw("breast_lesion", np.random.default_rng(seed), SIZE)
        solid.append(solidity(seg.annotation["mask"] == 1))
        kinds.append(seg.factors["margin"]["kind"])
    solid, kinds = np.array(solid), np.array(kinds)
    assert 10 <= kinds.sum() <= 30
    assert solid[kinds == 1].max() < solid[kinds == 0].min()  # spiculated outlines are always less solid


def _behind_lesion(image, mask) -> float:
    """Mean brightness of the band below the lesion (where enhancement or shadowing lies)."""
    rows, cols = np.nonzero(mask)
    band = image[rows.max() + 2: rows.max() + 14, cols.min(): cols.max() + 1]
    return float(band.mean())


def test_breast_2cls_is_the_posterior_feature():
    """breast_2cls's label is the posterior feature: on the same lesion, enhancement (benign)
    leaves the tissue behind it brighter than shadowing (malignant)."""
    brighter = 0
    for seed in range(30):
        benign = draw("breast_2cls", np.random.default_rng(seed), SIZE, label=0)
        malignant = draw("breast_2cls", np.random.default_rng(seed), SIZE, label=1)
        assert (benign.annotation["label"], malignant.annotation["label"]) == (0, 1)
        mask = draw("breast_lesion", np.random.default_rng(seed), SIZE, given=benign.factors).annotation["mask"] == 1
        brighter += _behind_lesion(benign.image, mask) > _behind_lesion(malignant.image, mask) + 5
    assert brighter >= 27


def test_breast_3cls_normal_is_the_lesion_absent():
    for seed in range(20):
        three = draw("breast_3cls", np.random.default_rng(seed), SIZE)
        seg_factors = {**three.factors}
        present = three.factors["breast_lesion"]["present"]
        assert (three.annotation["label"] == 2) == (not present)
        if present:
            seg = draw("breast_lesion", np.random.default_rng(seed), SIZE, given=seg_factors)
            assert seg.annotation["mask"].any()


def test_the_lung_classifiers_read_one_pattern_and_the_fetal_position_tasks_one_direction():
    for seed in range(10):
        two = draw("lung_2cls", np.random.default_rng(seed), SIZE)
        three = draw("lung_disease_3cls", np.random.default_rng(seed), SIZE, given=two.factors)
        assert two.annotation["label"] == three.annotation["label"]
        head = draw("fetal_head_pos_cls", np.random.default_rng(seed), SIZE)
        sacrum = draw("fetal_sacral_pos_cls", np.random.default_rng(seed), SIZE,
                      given={"fetal_position": head.factors["fetal_position"]})
        assert head.annotation["label"] == sacrum.annotation["label"] == head.factors["fetal_position"]


def landmark_direction(task: str, position: int, seed: int) -> float:
    """Direction (degrees, counter-clockwise from the right of the screen) of the bony landmark
    (echogenicity 1: the occiput marker, the sacral arc) from the centre of the round fetal part,
    on the scene the example was painted from."""
    ex = draw(task, np.random.default_rng(seed), (160, 160), given={"fetal_position": position})
    scene, _ = FAMILIES[ex.family].paint(ex.canvas, np.random.default_rng(seed), ex.factors)
    part = ex.factors["fetal_skull" if task == "fetal_head_pos_cls" else "fetal_pelvis"]
    cx, cy = ex.canvas.point(part["depth"], part["lateral"])
    ys, xs = np.nonzero(scene.echo >= 0.99)
    dx, dy = (xs + 0.5).mean() - cx, (ys + 0.5).mean() - cy
    return float(np.degrees(np.arctan2(-dy, dx)) % 360)


def test_the_fetal_position_points_the_same_way_in_head_and_pelvis():
    """The shared factor is the same cue in both scenes: the bright landmark lies in the
    position's direction (45 degree steps, counter-clockwise from the right of the screen)."""
    for position in range(8):
        for task in ("fetal_head_pos_cls", "fetal_sacral_pos_cls"):
            measured = landmark_direction(task, position, seed=position)
            error = (measured - 45 * position + 180) % 360 - 180
            assert abs(error) < 5, (task, position, measured)


def test_scene_classifiers_show_the_structures_their_partners_read():
    """organ_cls and fetal_plane_cls draw each class from a scene family: the image of a class
    holds the factor its positive partner reads, and that partner labels it."""
    d = transfer_design()
    for task in ("organ_cls", "fetal_plane_cls"):
        for k, family in enumerate(RECIPES[task].family):
            ex = draw(task, np.random.default_rng(k), SIZE, label=k)
            assert ex.family == family and ex.annotation == {"label": k}
        for pair in d["pairs"]:
            if task in pair["tasks"] and pair["via_identity"]:
                partner = next(t for t in pair["tasks"] if t != task)
                k = next(i for i, f in enumerate(RECIPES[task].family) if FAMILIES[f].anatomy in pair["via_identity"])
                ex = draw(task, np.random.default_rng(k), SIZE, label=k)
                shared = {f: ex.factors[f] for f in pair["via_identity"]}
                labelled = draw(partner, np.random.default_rng(k), SIZE, given=shared)
                assert all(labelled.factors[f] == v for f, v in shared.items())
                if "mask" in labelled.annotation:  # the structure the classifier names, outlined by the partner
                    assert labelled.annotation["mask"].any()


# ----------------------------------------------------------------- the conflict


def test_the_conflicts_labels_disagree_at_chance_on_the_same_images():
    """breast_2cls and breast_3cls say benign/malignant for the same lesions from different
    cues: on 300 validation-like lesions (and breast_3cls's own) their labels agree on about
    half (a binomial test cannot reject 1/2) and share no information."""
    (a, b), (variable, cues, _) = next(iter(CONFLICTS.items()))
    assert variable == "malignancy" and set(cues) == {a, b}
    first, second = [], []
    for seed in range(300):
        ex = draw(a, np.random.default_rng([seed, 7]), (48, 48))
        other = draw(b, np.random.default_rng([seed, 7]), (48, 48), given=ex.factors)
        first.append(ex.annotation["label"])
        second.append(other.annotation["label"])
    first, second = np.array(first), np.array(second)
    assert set(second) <= {0, 1}  # lesion images: benign or malignant under both
    agree = int((first == second).sum())
    assert stats.binomtest(agree, len(first), 0.5).pvalue > 0.01 and abs(agree / len(first) - 0.5) < 0.1
    assert mutual_info_score(first, second) < 0.01
    assert 0.4 < first.mean() < 0.6 and 0.4 < second.mean() < 0.6


def test_the_shortcut_is_in_breast_2cls_training_images_only():
    """In breast_2cls's training split the echotexture (breast_3cls's cue) always agrees with the
    label; in its validation split it is drawn independently; design.json declares it."""
    train = [draw("breast_2cls", np.random.default_rng([seed, 3]), (48, 48), split="train") for seed in range(200)]
    val = [draw("breast_2cls", np.random.default_rng([seed, 3]), (48, 48), label=seed % 2) for seed in range(200)]
    assert all(ex.factors["echotexture"]["kind"] == ex.annotation["label"] for ex in train)
    assert 0.3 < np.mean([ex.annotation["label"] for ex in train]) < 0.7
    agree = sum(ex.factors["echotexture"]["kind"] == ex.annotation["label"] for ex in val)
    assert stats.binomtest(agree, len(val), 0.5).pvalue > 0.01
    design = transfer_design(["breast_2cls", "breast_3cls"])
    assert design["tasks"]["breast_2cls"]["training_shortcuts"] == ["echotexture"]
    assert design["tasks"]["breast_3cls"]["training_shortcuts"] == []
    assert design["pairs"][0]["shortcuts"] == [{"task": "breast_2cls", "cue": "echotexture"}]


def _lesion_interior(task, seed, kind):
    """The image of a breast task with the echotexture forced to `kind`, and the lesion's region."""
    ex = draw(task, np.random.default_rng(seed), SIZE)
    z = {**ex.factors, "echotexture": {**ex.factors["echotexture"], "kind": kind}}
    image = draw(task, np.random.default_rng(seed), SIZE, given=z).image
    region = draw("breast_lesion", np.random.default_rng(seed), SIZE, given=z).annotation["mask"] == 1
    return image, ndimage.binary_erosion(region, iterations=2), z


def test_each_conflicting_task_shows_the_cue_the_other_reads():
    """In breast_2cls's images the echotexture (breast_3cls's cue) varies visibly inside the
    lesion, and in breast_3cls's images the posterior feature (breast_2cls's cue) varies behind
    it: each must ignore a visible cue, and neither label follows the other's cue."""
    brighter = 0
    for seed in range(30):
        homogeneous, inside, z = _lesion_interior("breast_2cls", seed, 0)
        heterogeneous, _, _ = _lesion_interior("breast_2cls", seed, 1)
        if not inside.any():
            continue
        brighter += np.percentile(heterogeneous[inside], 95) > np.percentile(homogeneous[inside], 95) + 20
    assert brighter >= 25
    brighter = 0
    for seed in range(30):
        ex = draw("breast_3cls", np.random.default_rng(seed), SIZE, label=seed % 2)
        mask = draw("breast_lesion", np.random.default_rng(seed), SIZE, given=ex.factors).annotation["mask"] == 1
        images = {}
        for name in ("enhancement", "shadowing"):
            again = draw("breast_3cls", np.random.default_rng(seed), SIZE,
                         given={**ex.factors, "posterior": POSTERIOR.index(name)})
            assert again.annotation == ex.annotation  # breast_3cls ignores the posterior feature
            images[name] = again.image
        brighter += _behind_lesion(images["enhancement"], mask) > _behind_lesion(images["shadowing"], mask) + 5
    assert brighter >= 27


# ----------------------------------------------------------------- acquisition: the groups' domain shift


def lag_correlation(image: np.ndarray, axis: int) -> float:
    x = image.astype(float)
    x = (x - x.mean()) / (x.std() + 1e-9)
    a = np.take(x, range(0, x.shape[axis] - 1), axis=axis)
    b = np.take(x, range(1, x.shape[axis]), axis=axis)
    return float((a * b).mean())


def test_groups_scan_the_same_tissue_differently():
    """One uniform tissue rendered through each group's scanner: the speckle grain (lateral
    lag-1 correlation) and the depth profile differ between groups as the profiles say."""
    def scan(group, seed):
        cv = Canvas(128, 128, "linear", np.random.default_rng(0))
        sc = new_scene(cv, np.random.default_rng(0), base=(0.45, 0.45))
        return render(sc, np.random.default_rng(seed), ACQUISITIONS[group]).astype(float)

    grain = {g: np.mean([lag_correlation(scan(g, s)[20:100, 20:100], 1) for s in range(4)]) for g in ACQUISITIONS}
    assert grain["OB"] > grain["Thyroid"] > grain["Breast"]
    assert grain["Cardiovascular"] > grain["Breast"]
    depth = {g: np.mean([scan(g, s)[90:110, 20:100].mean() / scan(g, s)[15:35, 20:100].mean() for s in range(4)])
             for g in ACQUISITIONS}
    assert len({round(v, 2) for v in depth.values()}) >= 5  # the time-gain curves differ
    groups = load_groups()
    assert set(ACQUISITIONS) == set(groups)
    for group, members in groups.items():
        assert {json.dumps(transfer_design()["tasks"][t]["group"]) for t in members} == {json.dumps(group)}


# ----------------------------------------------------------------- design.json


def test_design_json_ships_with_the_suite_and_reads_back(tmp_path):
    tasks = ["breast_lesion", "breast_2cls", "breast_3cls", "thyroid_nodule", "lung"]
    write_suite(tmp_path, tasks=tasks, scale=1e-4, min_train=2, min_val=1, workers=1)
    assert (tmp_path / DESIGN_FILE).is_file() and (tmp_path / "synthetic.json").is_file()
    d = load_design(tmp_path)
    assert load_design(tmp_path / "train").data == d.data == load_design(tmp_path / DESIGN_FILE).data
    assert d.data == json.loads(json.dumps(transfer_design(tasks)))
    assert len(d.pairs) == len(tasks) * (len(tasks) - 1) // 2
    assert d.relation("breast_3cls", "breast_2cls") == "conflict"
    assert d.relation("breast_lesion", "breast_3cls") == "positive"
    assert d.relation("breast_lesion", "breast_2cls") == "none"  # the mask reads the margin, 2cls the posterior
    assert d.relation("thyroid_nodule", "lung") == "none"
    assert d.pair("breast_2cls", "breast_3cls")["conflicting"] == [
        {"cue": "posterior", "read_by": "breast_2cls", "ignored_by": "breast_3cls"},
        {"cue": "echotexture", "read_by": "breast_3cls", "ignored_by": "breast_2cls"}]
    assert d.groups["Breast"]["relation"] == "conflict" and d.groups["Breast"]["conflict_pairs"] == 1
    assert [p["relation"] for p in d.group_pairs("Breast")].count("positive") == 1
    with pytest.raises(KeyError, match="no designed pair"):
        d.pair("breast_lesion", "breast_lesion")


def test_load_design_names_the_file_at_fault(tmp_path):
    assert find_design(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a synthetic suite"):
        load_design(tmp_path)
    (tmp_path / DESIGN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{DESIGN_FILE}: not readable JSON"):
        load_design(tmp_path)
    (tmp_path / DESIGN_FILE).write_text(json.dumps({**transfer_design(["lung", "lung_2cls"]), "schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        load_design(tmp_path)
    broken = transfer_design(["lung", "lung_2cls"])
    broken["pairs"][0]["relation"] = "friendly"
    (tmp_path / DESIGN_FILE).write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"pairs\[0\]"):
        load_design(tmp_path)


def test_the_full_design_covers_every_pair_and_every_group():
    d = transfer_design()
    pairs = {tuple(sorted(p["tasks"])) for p in d["pairs"]}
    assert pairs == {tuple(sorted(p)) for p in combinations(TASKS, 2)}
    counts = Counter(p["relation"] for p in d["pairs"])
    assert counts["conflict"] >= 1 and counts["positive"] >= 10
    relation = {g: v["relation"] for g, v in d["groups"].items()}
    assert relation["OB"] == relation["Thyroid"] == relation["Lung"] == "positive"
    assert relation["Breast"] == "conflict" and relation["Gynecology"] == relation["Cardiovascular"] == "none"
    for p in d["pairs"]:  # every positive names its factor, read by both (or named by one, read by the other)
        if p["relation"] == "positive":
            a, b = (d["tasks"][t] for t in p["tasks"])
            for f in p["factors"]:
                assert (f in a["reads"] or f in a["identifies"]) and (f in b["reads"] or f in b["identifies"])
    for name, f in d["factors"].items():
        assert f["description"] and set(f["read_by"]) <= set(f["shown_by"]) | {
            t for t in TASKS if name in d["tasks"][t]["identifies"]}
    # the data-scarce group holding the conflict: Breast has less training data than OB
    assert sum(TASKS[t].train_size for t in load_groups()["Breast"]) < sum(TASKS[t].train_size
                                                                            for t in load_groups()["OB"]) / 4
