"""Every command's file readers fed random bytes and truncations (hypothesis): each run ends in the
command's documented answer -- success (exit 0), data.check's list of problems (exit 1), or one
`prog: error: ...` message (exit 1 for the machine, 2 for the input) -- never a traceback (an
exception escaping `main` fails the example) and never a hang (SIGALRM fails it).

The files: data.check's CSVs, images and masks; predict's checkpoint (json and safetensors), test
CSV and image; evaluate's prediction files, predicted and ground-truth masks and CSV; export's
checkpoint; train's --config file; and (slow, they need a trained run) report's run-directory
files, a resumed run's config.yaml and training checkpoint, and train's --pretrained weights.
"""
import contextlib
import io
import json
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2dino import evaluate as evaluate_cli
from m2dino import export as export_cli
from m2dino import predict as predict_cli
from m2dino import report as report_cli
from m2dino import train as train_cli
from m2dino.data import check as check_cli

TASKS = ["breast_2cls", "lung"]
SUITE = dict(tasks=TASKS, min_train=4, min_val=3)
SECONDS = 120  # a command over this is a hang
RUN = ["--paradigm", "all", "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--bootstrap", "0",
       "--jobs", "1", "--no-progress", "--num-experts", "2", "--top-k", "1", "--seeds", "0"]

# Any JSON (and so YAML) value: what a structured file may be turned into
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)
# How a file is damaged: replaced by random bytes, cut short, a run of random bytes spliced in,
# replaced by a random JSON document, or (JSON and YAML files) one value in it replaced by one.
DAMAGE = st.one_of(
    st.tuples(st.just("replace"), st.binary(max_size=1024)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("splice"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
    st.tuples(st.just("document"), JSON),
    st.tuples(st.just("value"), st.tuples(st.integers(0, 10 ** 6), JSON)),
    st.tuples(st.just("value"), st.tuples(st.integers(0, 10 ** 6), JSON)),
)


def _nodes(doc, path=()):
    """Every (path, value) of a parsed document, the root first."""
    yield path, doc
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from _nodes(value, path + (key,))


def _replaced(original: bytes, index: int, value) -> bytes:
    """`original` (JSON or YAML) with its index-th node replaced by `value`; random bytes when it is neither."""
    import yaml
    try:
        doc, dump = json.loads(original), lambda d: json.dumps(d).encode()
    except ValueError:
        try:
            doc, dump = yaml.safe_load(original), lambda d: yaml.safe_dump(d).encode()
        except yaml.YAMLError:
            return json.dumps(value).encode()
    nodes = list(_nodes(doc))
    path, _ = nodes[index % len(nodes)]
    if not path:
        return dump(value)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return dump(doc)


def damaged(original: bytes, damage) -> bytes:
    kind, arg = damage
    if kind == "replace":
        return arg
    if kind == "truncate":
        return original[:int(len(original) * arg)]
    if kind == "document":
        return json.dumps(arg).encode()
    if kind == "value":
        return _replaced(original, *arg)
    at, junk = arg
    i = int(len(original) * at)
    return original[:i] + junk + original[i + len(junk):]


def answered(prog: str, call) -> int:
    """Run `call()` (a command's main) with a hang alarm; assert its answer is a documented one."""
    def hang(signum, frame):
        raise TimeoutError(f"{prog} did not answer within {SECONDS} s")

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = call()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    text = err.getvalue()
    assert "Traceback" not in text, text
    if code == 0:
        return code
    if prog == "m2dino.data.check" and code == 1 and "problem(s):" in out.getvalue():
        return code
    assert code in (1, 2) and f"{prog}: error: " in text, (code, text[-2000:], out.getvalue()[-2000:])
    return code


@pytest.fixture(scope="module")
def world(suite, tmp_path_factory):
    """The suite, a (untrained) checkpoint of its tasks and its predictions of the val split."""
    from m2dino.models.m2dino import create_model, save_model

    base = tmp_path_factory.mktemp("fuzz")
    checkpoint, _ = save_model(create_model("dinov3_tiny", TASKS, num_experts=2, top_k=1, moe_layers=1,
                                            img_size=32), base / "ckpt" / "best")
    predictions = base / "predictions"
    assert predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(suite), "--split", "val",
                             "--out", str(predictions), "--device", "cpu"]) == 0
    return {"suite": suite, "checkpoint": checkpoint, "predictions": predictions}


@pytest.fixture(scope="module")
def trained_run(suite, tmp_path_factory):
    """A trained run of every paradigm (for report and a resumed train)."""
    run = tmp_path_factory.mktemp("fuzz-run") / "run"
    assert train_cli.main(["--data", str(suite), "--out", str(run), *RUN]) == 0
    return run


@contextlib.contextmanager
def copy_of(folder: Path, scratch: Path):
    """A fresh copy of `folder` (each example damages its own)."""
    target = scratch / folder.name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, symlinks=True)
    try:
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def first(folder: Path, pattern: str) -> Path:
    return sorted(folder.glob(pattern))[0]


FAST = settings(max_examples=20, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEWER = settings(FAST, max_examples=8)  # a command that loads a model for each example
SLOW = settings(FAST, max_examples=4)  # a command that trains


# ------------------------------------------------------------------------ data.check
@pytest.mark.parametrize("which", ["train/csv_files/*breast_2cls*.csv", "train/csv_files/*lung*.csv",
                                   "train/Classification/**/*.bmp", "train/Segmentation/**/masks/*.png"])
@FAST
@given(damage=DAMAGE)
def test_data_check(world, tmp_path, which, damage):
    with copy_of(world["suite"], tmp_path) as root:
        target = first(root, which)
        target.write_bytes(damaged(target.read_bytes(), damage))
        answered("m2dino.data.check", lambda: check_cli.main([str(root)]))


# ------------------------------------------------------------------------ predict
@pytest.mark.parametrize("which", ["ckpt.json", "ckpt.safetensors", "data/val/csv_files/*lung*.csv",
                                   "data/val/Segmentation/**/images/*.bmp"])
@FEWER
@given(damage=DAMAGE)
def test_predict(world, tmp_path, which, damage):
    scratch = tmp_path / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    shutil.copytree(world["suite"], scratch / "data")
    for suffix in (".json", ".safetensors"):
        shutil.copy(world["checkpoint"].with_suffix(suffix), (scratch / "ckpt").with_suffix(suffix))
    target = first(scratch, which)
    target.write_bytes(damaged(target.read_bytes(), damage))
    answered("m2dino.predict", lambda: predict_cli.main([
        "--checkpoint", str(scratch / "ckpt.safetensors"), "--data-root", str(scratch / "data"), "--split", "val",
        "--out", str(scratch / "out"), "--device", "cpu", "--tasks", "lung"]))


# ------------------------------------------------------------------------ evaluate
@pytest.mark.parametrize("which", ["predictions/classification_predictions.json", "predictions/**/*.png",
                                   "data/val/csv_files/*breast_2cls*.csv", "data/val/Segmentation/**/masks/*.png"])
@FAST
@given(damage=DAMAGE)
def test_evaluate(world, tmp_path, which, damage):
    scratch = tmp_path / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(world["suite"], scratch / "data")
    shutil.copytree(world["predictions"], scratch / "predictions")
    target = first(scratch, which)
    target.write_bytes(damaged(target.read_bytes(), damage))
    answered("m2dino.evaluate", lambda: evaluate_cli.main([
        "--data-root", str(scratch / "data"), "--split", "val", "--predictions", str(scratch / "predictions"),
        "--json", str(scratch / "scores.json")]))


# ------------------------------------------------------------------------ export
@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
@FAST
@given(damage=DAMAGE)
def test_export(world, tmp_path, suffix, damage):
    stem = tmp_path / "ckpt"
    for s in (".json", ".safetensors"):
        shutil.copy(world["checkpoint"].with_suffix(s), stem.with_suffix(s))
    target = stem.with_suffix(suffix)
    target.write_bytes(damaged(target.read_bytes(), damage))
    out = tmp_path / "entry"
    shutil.rmtree(out, ignore_errors=True)
    # a checkpoint that survives its damage is exported as far as the (missing) wheel: exit 2 there
    answered("m2dino.export", lambda: export_cli.main([
        "--checkpoint", str(target), "--out", str(out), "--wheel", str(tmp_path / "missing.whl"), "--no-measure"]))


# ------------------------------------------------------------------------ report
@pytest.mark.slow
@pytest.mark.parametrize("which", ["au/metrics.json", "au/all/eval.json", "au/all/eval_per_image.json",
                                   "ts/*/eval_per_image.json", "cg/metrics.json", "config.yaml",
                                   "au/all/routing.json"])
@FEWER
@given(damage=DAMAGE)
def test_report(trained_run, tmp_path, which, damage):
    with copy_of(trained_run, tmp_path) as run:
        target = first(run, which)
        target.write_bytes(damaged(target.read_bytes(), damage))
        answered("m2dino.report", lambda: report_cli.main([str(run), "--out", str(tmp_path / "report"),
                                                           "--bootstrap", "0"]))


# ------------------------------------------------------------------------ train
@FAST
@given(damage=DAMAGE)
def test_train_config_file(world, tmp_path, damage):
    config = tmp_path / "mine.yaml"
    config.write_bytes(damaged((Path(__file__).parents[2] / "configs" / "demo_cpu.yaml").read_bytes(), damage))
    answered("m2dino.train", lambda: train_cli.main(["--config", str(config), "--data", str(tmp_path / "nowhere"),
                                                     "--out", str(tmp_path / "out")]))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["config.yaml", "au/all/last/train_state.pt", "au/all/last/model.safetensors",
                                   "au/all/last/model.json"])
@SLOW
@given(damage=DAMAGE)
def test_train_resume(world, trained_run, tmp_path, which, damage):
    with copy_of(trained_run, tmp_path) as run:
        target = run / which
        target.write_bytes(damaged(target.read_bytes(), damage))
        answered("m2dino.train", lambda: train_cli.main(["--data", str(world["suite"]), "--out", str(run),
                                                         "--resume", *RUN]))


@pytest.mark.slow
@SLOW
@given(damage=DAMAGE)
def test_train_pretrained_weights(world, tmp_path, damage):
    import torch

    from m2dino.models.weights import dinov3_tiny

    weights = tmp_path / "tiny.pth"
    if not weights.exists():
        torch.save(dinov3_tiny().state_dict(), weights)
    damaged_weights = tmp_path / "damaged.pth"
    damaged_weights.write_bytes(damaged(weights.read_bytes(), damage))
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    answered("m2dino.train", lambda: train_cli.main([
        "--data", str(world["suite"]), "--out", str(out), "--pretrained", str(damaged_weights), "--steps", "1",
        "--paradigm", "au", "--img-size", "32", "--batch-size", "4",
        "--bootstrap", "0", "--jobs", "1", "--no-progress", "--num-experts", "2", "--top-k", "1", "--seeds", "0"]))
