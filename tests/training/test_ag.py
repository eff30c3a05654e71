"""AG, the affinity-grouping paradigm (m2dino.training.ag): `--paradigm ag` alone probes the AU
model's first steps, then trains its groups; the groups file is written once and read back on
--resume, never recomputed; every seed of --seeds groups from its own probe; --random-groupings
draws seeded partitions with AG's group sizes."""
import json

import pytest

from m2dino.evaluation.affinity import AFFINITY_FILE, read_affinity
from m2dino.evaluation.grouping import write_groups_file
from m2dino.tasks import load_groups
from m2dino.training.ag import random_partition
from m2dino.training.study import run

# two clinical groups (Breast, Lung): AG trains two groups unless --num-groups says otherwise
TASKS = ["breast_2cls", "breast_3cls", "lung", "lung_2cls"]
SUITE = dict(tasks=TASKS, min_train=8, min_val=3)
RUN_OPTIONS = dict(bootstrap=0, jobs=1, steps=3, affinity_steps=2)  # steps 0 and 1 measured (not the last: lr 0)


def members(groups: dict) -> list[str]:
    return sorted(t for m in groups.values() for t in m)


@pytest.mark.slow
def test_ag_alone_probes_the_au_model_then_trains_its_groups(suite, tiny_config, tmp_path):
    out = tmp_path / "run"
    results = run(tiny_config(suite, out, paradigm="ag"))
    record = read_affinity(out / "ag" / AFFINITY_FILE)
    assert record.tasks == TASKS and record.steps == [0, 1] and record.measured["every"] == 1
    groups = load_groups(out / "ag" / "groups.yaml")
    assert len(groups) == 2 and members(groups) == TASKS
    grouping = json.loads((out / "ag" / "grouping.json").read_text())
    assert grouping["groups"] == groups and grouping["affinity"] == f"ag/{AFFINITY_FILE}"
    assert grouping["measured_steps"] == 2 and grouping["num_groups"] == 2
    assert results["ag"]["models"] == groups
    assert json.loads((out / "ag" / "metrics.json").read_text())["models"] == groups
    assert not (out / "au").exists()  # the probe's model is not kept


@pytest.mark.slow
def test_resume_reads_the_groups_file_and_never_regroups(suite, tiny_config, tmp_path):
    out = tmp_path / "run"
    (out / "ag").mkdir(parents=True)
    # an earlier run's grouping (here written by hand, unlike what the affinity would choose)
    mine = {"mine_1": ["breast_2cls", "lung"], "mine_2": ["breast_3cls", "lung_2cls"]}
    write_groups_file(out / "ag" / "groups.yaml", mine)
    results = run(tiny_config(suite, out, paradigm="ag", num_groups=3))
    assert results["ag"]["models"] == mine and load_groups(out / "ag" / "groups.yaml") == mine
    assert not (out / "ag" / AFFINITY_FILE).exists()  # no probe: the groups were there
    first = (out / "ag" / "groups.yaml").read_bytes()
    again = run(tiny_config(suite, out, paradigm="ag", num_groups=3, resume=True))
    assert again["ag"]["models"] == mine and (out / "ag" / "groups.yaml").read_bytes() == first


def test_a_groups_file_of_other_tasks_is_refused(suite, tiny_config, tmp_path):
    out = tmp_path / "run"
    (out / "ag").mkdir(parents=True)
    write_groups_file(out / "ag" / "groups.yaml", {"g": ["breast_2cls", "lung"]})
    with pytest.raises(ValueError, match="groups.yaml"):
        run(tiny_config(suite, out, paradigm="ag"))


@pytest.mark.slow
def test_with_ag_groups_from_the_au_probe_and_resume_keeps_them(suite, tiny_config, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(suite, out, paradigm="all", with_ag=True, random_groupings=1)
    results = run(config)
    assert set(results) == {"ts", "cg", "au", "ag", "random_1"}
    grouping = json.loads((out / "ag" / "grouping.json").read_text())
    assert grouping["affinity"] == f"au/all/{AFFINITY_FILE}" and not (out / "ag" / AFFINITY_FILE).exists()
    groups = (out / "ag" / "groups.yaml").read_bytes()
    report = json.loads((out / "report" / "report.json").read_text())
    assert "ag" in report["paradigms"] and "random_1" not in report["paradigms"]
    assert report["affinity_groupings"]["random_groupings"] == ["random_1"]
    run(tiny_config(suite, out, paradigm="all", with_ag=True, random_groupings=1, resume=True))
    assert (out / "ag" / "groups.yaml").read_bytes() == groups


@pytest.mark.slow
def test_every_seed_groups_from_its_own_probe(suite, tiny_config, tmp_path):
    out = tmp_path / "run"
    run(tiny_config(suite, out, paradigm="ag", seeds=[0, 1], random_groupings=2))
    for seed in (0, 1):
        folder = out / f"seed-{seed}"
        grouping = json.loads((folder / "ag" / "grouping.json").read_text())
        assert grouping["affinity"] == f"ag/{AFFINITY_FILE}"
        ag = load_groups(folder / "ag" / "groups.yaml")
        assert members(ag) == TASKS
        for index in (1, 2):
            drawn = load_groups(folder / f"random_{index}" / "groups.yaml")
            assert sorted(map(len, drawn.values())) == sorted(map(len, ag.values()))
            assert drawn == random_partition(ag, seed, index)
    section = json.loads((out / "report" / "report.json").read_text())["affinity_groupings"]
    assert set(section["groups"]) == {"seed-0", "seed-1"} and section["random_groupings"] == ["random_1", "random_2"]
    assert section["groups"]["seed-1"]["ag"] == load_groups(out / "seed-1" / "ag" / "groups.yaml")
    assert section["ag_vs_cg"] is None and section["ag_vs_random"] is None  # no TS: no change to compare


def test_random_partitions_have_ags_sizes_and_follow_the_seed():
    ag = {"a": ["t1", "t2", "t3"], "b": ["t4"], "c": ["t5", "t6"]}
    tasks = sorted(t for m in ag.values() for t in m)
    draws = [random_partition(ag, seed, index) for seed in (0, 1) for index in (1, 2, 3)]
    for drawn in draws:
        assert members(drawn) == tasks
        assert sorted(map(len, drawn.values())) == [1, 2, 3]
    assert random_partition(ag, 0, 1) == draws[0]  # seeded: the same draw again
    assert len({json.dumps(d, sort_keys=True) for d in draws}) > 1


@pytest.mark.parametrize("options, flag", [
    (dict(paradigm="au", with_ag=True), "with_ag"),
    (dict(paradigm="all", random_groupings=2), "random_groupings"),
    (dict(paradigm="cg", num_groups=2), "num_groups"),
    (dict(paradigm="ag", num_groups=0), "num_groups"),
    (dict(paradigm="ag", random_groupings=-1), "random_groupings"),
])
def test_ag_options_out_of_place_are_refused(suite, tiny_config, tmp_path, options, flag):
    with pytest.raises(ValueError, match=flag.replace("_", "-")):
        tiny_config(suite, tmp_path / "run", **options)
