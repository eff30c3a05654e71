"""`python -m m2dino.export`: a trained tiny checkpoint becomes a challenge entry whose
`Model().predict`, run in a fresh interpreter from the exported folder, writes exactly what
`python -m m2dino.predict` writes; bad input is refused with nothing written; the Dockerfile
holds what can be checked without a Docker engine; the entry's files are the package's own
(model.py importable, the templates filled), and the wheel carries them; the export writes over
none of its inputs, one export per folder at a time, and a read-only or full disk is one line
(exit 1) with nothing half-written."""
import ast
import csv
import hashlib
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from faults import disk_full, read_only
from locks import hold_lock

import m2dino
from m2dino import export as export_cli
from m2dino import predict as predict_cli
from m2dino.evaluation import evaluate as E
from m2dino.export import folder as X
from m2dino.export import wheel as W
from m2dino.export.entry import model as entry_model
from m2dino.export.options import DEFAULT_BASE_IMAGE

ROOT = Path(m2dino.__file__).resolve().parents[1]  # the checkout whose m2dino is under test
ENTRY = Path(entry_model.__file__).parent  # the entry's files as the package ships them
ENTRY_DATA = ("Dockerfile", "Dockerfile.build-ext", "README.md", "readme-kernels-pure.md", "readme-kernels-ext.md",
              "readme-measured.md", "readme-not-measured.md")
TRAINED = ["cervix_multi", "fetal_head_pos_cls", "thyroid_nodule_det", "IUGC"]
UNKNOWN = "lung_2cls"  # in the data, not in the checkpoint
SUITE = dict(tasks=TRAINED + [UNKNOWN], min_train=4, min_val=3)


@pytest.fixture(scope="module")
def trained(tiny_suite, tmp_path_factory):
    """A checkpoint trained for a few steps on four tasks, and its export (measured)."""
    from m2dino.training.config import TrainConfig
    from m2dino.training.study import run

    suite = tiny_suite(**SUITE)
    base = tmp_path_factory.mktemp("export")
    run(TrainConfig(data=str(suite), out=str(base / "run"), paradigm="au", tasks=TRAINED, img_size=32,
                    batch_size=4, steps=3, num_experts=2, top_k=1, log_every=1, progress=False, seeds=None,
                    from_scratch=True).validate())  # the entry then says: trained from random weights
    checkpoint = base / "run" / "au" / "all" / "best.safetensors"
    out = base / "predictor"
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", "3",
                            "--measure-rows", "2"]) == 0
    return suite, checkpoint, out


def child_env(**extra) -> dict:
    """The environment of a fresh interpreter that sees the m2dino under test (as installed)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", **extra}


# Runs in the exported folder (sys.path[0] = ''), with every network connection refused.
CHILD = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access while predicting")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = refuse
import model
result = model.Model(device="cpu").predict(sys.argv[1], sys.argv[2])
import m2dino
print(json.dumps({"counts": result["counts"], "skipped": len(result["skipped"]), "m2dino": m2dino.__file__,
                  "model": model.__file__}))
"""


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def val_rows(suite: Path) -> dict[str, int]:
    counts = {}
    for csv_file in (suite / "val" / "csv_files").glob("*.csv"):
        with open(csv_file, newline="") as f:
            for row in csv.DictReader(f):
                counts[row["task_id"]] = counts.get(row["task_id"], 0) + 1
    return counts


def test_exported_model_predicts_like_m2dino_predict_and_scores(trained, tmp_path):
    suite, checkpoint, folder = trained
    entry = tmp_path / "entry"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(suite / "val"), str(entry)], cwd=folder,
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(child["model"]).parent == folder and Path(child["m2dino"]).is_relative_to(ROOT)
    expected = val_rows(suite)
    assert child["counts"] == {t: n for t, n in expected.items() if t != UNKNOWN}  # every known row
    assert child["skipped"] == expected[UNKNOWN]
    assert f"{UNKNOWN} ({expected[UNKNOWN]} rows)" in proc.stderr  # the warning names task and count

    cli = tmp_path / "cli"
    assert predict_cli.main(["--checkpoint", str(checkpoint), "--data-root", str(suite / "val"), "--out", str(cli),
                             "--batch-size", "3", "--device", "cpu"]) == 0
    ours, theirs = files_of(entry), files_of(cli)
    assert sorted(ours) == sorted(theirs)
    masks = [name for name in ours if name.endswith(".png")]
    assert len(masks) == expected["cervix_multi"]
    for name, data in ours.items():
        if name.endswith(".png"):
            assert data == theirs[name], name  # byte for byte
        else:
            assert json.loads(data) == json.loads(theirs[name]), name  # value for value
    skipped = json.loads(ours["missing_tasks.json"])
    assert len(skipped) == expected[UNKNOWN]
    assert all(set(r) == {"csv", "row", "task_id", "image_path"} and r["task_id"] == UNKNOWN for r in skipped)

    results = E.evaluate_folder(suite / "val", entry, tasks=TRAINED)
    assert results["num_samples"] == {t: expected[t] for t in TRAINED}
    assert set(results["tasks"]) == set(TRAINED)
    assert 0.0 <= results["tasks"]["cervix_multi"]["dice"] <= 1.0
    assert results["tasks"]["IUGC"]["mre"] >= 0.0


def test_exported_folder_contents_and_measurement(trained):
    _, checkpoint, folder = trained
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    wheels = [n for n in names if n.startswith("wheels/")]
    assert len(wheels) == 1 and wheels[0].endswith("-py3-none-any.whl")
    assert set(names) == {"Dockerfile", "README.md", "model.json", "model.py", "model.safetensors",
                          "predictor.json", "requirements.txt", *wheels}
    assert not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in names)  # no pickle anywhere
    assert all(oct(p.stat().st_mode & 0o777) in ("0o644", "0o755") for p in folder.rglob("*"))
    settings = json.loads((folder / "predictor.json").read_text())
    assert settings["checkpoint"] == "model.safetensors" and settings["batch_size"] == 3
    assert (settings["device"], settings["amp"], settings["tta"]) == ("auto", "off", False)
    assert sorted(t["task_id"] for t in settings["tasks"]) == sorted(TRAINED)
    assert (folder / "model.safetensors").read_bytes() != b""  # the weights, re-saved by save_model
    assert json.loads((folder / "model.json").read_text()) == json.loads(checkpoint.with_suffix(".json").read_text())

    readme = (folder / "README.md").read_text()
    per_image = re.search(r"time per image[^|]*the median of the 5 timed passes\) \| ([0-9.]+) ms", readme)
    spread = re.search(r"the fastest and the slowest timed pass \| ([0-9.]+) ms, ([0-9.]+) ms", readme)
    memory = re.search(r"peak resident memory of the process \| ([0-9]+) MiB", readme)
    assert per_image and float(per_image.group(1)) > 0, readme
    assert spread and float(spread.group(1)) <= float(per_image.group(1)) <= float(spread.group(2)), readme
    assert memory and int(memory.group(1)) > 100  # torch alone takes more
    assert "logical cores" in readme and "kernel backend `reference`" in readme and "8 images" in readme
    load = re.search(r"1-minute load average was ([0-9.]+) before the timed passes and ([0-9.]+) after",
                     " ".join(readme.split()))
    assert load, readme  # the machine's load, beside the times it explains
    requirements = [line for line in (folder / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert "numpy>=1.24" in requirements and not any(r.startswith("torch") for r in requirements)


def test_entry_files_are_the_package_data(trained):
    """model.py is a module of the package (importable, parsed, the challenge's interface),
    copied as it is; the Dockerfile and README are the shipped templates, every placeholder
    filled, and both say under which licence the weights inside are."""
    _, _, folder = trained
    assert (folder / "model.py").read_bytes() == (ENTRY / "model.py").read_bytes()
    tree = ast.parse((ENTRY / "model.py").read_text(), filename="model.py")
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test)
                   in ('__name__ == "__main__"', "__name__ == '__main__'")]
    assert len(main_blocks) == 1 and "main(sys.argv[1:])" in ast.unparse(main_blocks[0])
    assert list(inspect.signature(entry_model.Model).parameters) == ["device"]
    assert list(inspect.signature(entry_model.Model.predict).parameters) == ["self", "data_root", "output_dir",
                                                                             "batch_size"]
    for name in ("Dockerfile", "README.md"):  # trained from random weights: the checkpoint says so
        text = (folder / name).read_text()
        assert "${" not in text, name
        text = " ".join(text.replace("#", " ").split())  # the words, whatever the line breaks
        assert "trained from random weights" in text and "does not cover them" in text, name
        assert "your responsibility" in text and "Apache License 2.0" in text, name
    assert 'licenses="Apache-2.0"' in (folder / "Dockerfile").read_text()
    # `python model.py`, the image's command: /input/ into /output/ (absent here, so it stops naming it)
    if not Path("/input").exists():
        proc = subprocess.run([sys.executable, "model.py"], cwd=folder, env=child_env(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 2 and "/input has no csv_files/ folder" in proc.stderr, proc.stderr


def test_the_two_dockerfiles_share_their_run_time_stage():
    """The --build-ext Dockerfile's last stage is the plain one but for the kernel backend, the
    OpenMP library and where the wheel comes from: the two templates cannot drift apart."""
    from m2dino.export.render import dockerfile_text

    wheel = "m2dino-1.0-py3-none-any.whl"
    plain = dockerfile_instructions(dockerfile_text(wheel, DEFAULT_BASE_IMAGE, False, "9.0", "1.0"))
    ext = dockerfile_instructions(dockerfile_text(wheel, DEFAULT_BASE_IMAGE, True, "9.0", "1.0"))
    runtime = ext[ext.index(("FROM", DEFAULT_BASE_IMAGE)):]

    def same_but_kernels(steps):
        return [(op, args.replace("M2DINO_KERNELS_BACKEND=auto", "M2DINO_KERNELS_BACKEND=reference")
                 .replace("--from=kernels /wheels/", "wheels/")) for op, args in steps if "libgomp1" not in args]

    assert same_but_kernels(runtime) == same_but_kernels(plain)
    assert runtime != plain and len(runtime) == len(plain) + 1


def test_licence_and_provenance_follow_the_pretrained_record():
    """Fine-tuned from DINOv3 weights: the DINOv3 License, naming the file; from random weights:
    not Meta's; not recorded (an older checkpoint): the DINOv3 License if it was fine-tuned."""
    from m2dino.export.render import dockerfile_text, licence_text

    record = {"file": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth", "sha256": "ab" * 32, "preset": "dinov3_vitb16"}
    dinov3 = "Apache-2.0 AND LicenseRef-DINOv3-License"
    cases = [(record, ["fine-tuned from Meta's DINOv3 backbone", record["file"], "abababab",
                       "are under the DINOv3 License", "not under Apache-2.0"], dinov3),
             ("none", ["trained from random weights", "does not cover them"], "Apache-2.0"),
             (None, ["does not record which weights", "If it was fine-tuned from Meta's DINOv3 weights"], dinov3)]
    for pretrained, phrases, label in cases:
        docker = dockerfile_text("w.whl", DEFAULT_BASE_IMAGE, False, "9.0", "1.0", pretrained=pretrained)
        readme = " ".join(licence_text(pretrained).replace("[", "").replace("]", "").split())
        words = " ".join(docker.replace("#", " ").split())
        for phrase in phrases:
            assert phrase in words and phrase in readme, (pretrained, phrase)
        assert f'LABEL org.opencontainers.image.licenses="{label}"' in docker
        assert "${" not in docker


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def test_dockerfile_without_a_docker_engine(trained, tmp_path):
    _, checkpoint, folder = trained
    steps = dockerfile_instructions((folder / "Dockerfile").read_text())
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", froms[0])
    wheel = next(p.name for p in (folder / "wheels").iterdir())
    copies = [args for op, args in steps if op == "COPY"]
    assert f"wheels/{wheel} /tmp/build/" in copies  # the wheel built from this checkout is copied in
    for args in copies:  # every file the build copies is in the folder (the build context)
        *sources, _ = shlex.split(args)
        assert all((folder / s).exists() for s in sources), args
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert f"pip install --no-deps /tmp/build/{wheel}" in runs
    env = " ".join(args for op, args in steps if op == "ENV")
    assert "HOME=/home/predictor" in env and "M2DINO_KERNELS_BACKEND=reference" in env
    # at run time only CMD runs: python model.py, no entrypoint, no download step
    assert [op for op, _ in steps if op in ("CMD", "ENTRYPOINT")] == ["CMD"]
    assert steps[-1] == ("CMD", '["python", "model.py"]')
    assert not re.search(r"\b(curl|wget|git|pip download)\b", runs)

    # --build-ext: the kernels compiled in the -devel image of the same torch, from the copied sources
    wheel_path = folder / "wheels" / wheel
    ext = tmp_path / "ext"
    X.export_predictor(checkpoint, ext, wheel=wheel_path, build_ext=True, cuda_arches="9.0", measure=None)
    steps = dockerfile_instructions((ext / "Dockerfile").read_text())
    froms = [args for op, args in steps if op == "FROM"]
    assert froms == [froms[1].replace("-runtime", "-devel") + " AS kernels", DEFAULT_BASE_IMAGE]
    assert 'TORCH_CUDA_ARCH_LIST="9.0"' in " ".join(args for op, args in steps if op == "RUN")
    assert f"--from=kernels /wheels/{wheel} /tmp/build/" in [args for op, args in steps if op == "COPY"]
    for name in ("setup.py", "pyproject.toml", "csrc/kernels.cu", "m2dino/evaluation/predict.py",
                 "m2dino_kernels/backends.py"):
        assert (ext / "src" / name).is_file(), name
    assert not list((ext / "src").rglob("*.so")) and not list((ext / "src").rglob("__pycache__"))


def test_bad_input_is_refused_and_nothing_written(trained, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    _, checkpoint, folder = trained
    wheel = next((folder / "wheels").iterdir())
    out = tmp_path / "out"
    config = checkpoint.with_suffix(".json").read_text()
    state = load_file(str(checkpoint))

    torch.save(state, tmp_path / "model.pth")
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "best.safetensors").write_bytes(checkpoint.read_bytes())
    save_file(state, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    (tmp_path / "plain.json").write_text(config)
    (tmp_path / "cut.safetensors").write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    (tmp_path / "cut.json").write_text(config)
    (tmp_path / "renamed.safetensors").write_bytes((tmp_path / "model.pth").read_bytes())
    (tmp_path / "renamed.json").write_text(config)
    cases = {
        tmp_path / "model.pth": "is a pickle",
        tmp_path / "alone" / "best.safetensors": "best.json does not exist",
        tmp_path / "plain.safetensors": "not an m2dino checkpoint",
        tmp_path / "cut.safetensors": "cut.safetensors",
        tmp_path / "renamed.safetensors": "not readable",  # load_model's check, naming the file
    }
    for bad, message in cases.items():
        assert export_cli.main(["--checkpoint", str(bad), "--out", str(out), "--wheel", str(wheel),
                                "--no-measure"]) == 2
        err = capsys.readouterr().err
        assert "m2dino.export: error:" in err and message in err and bad.name in err, (bad, err)
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out), "--wheel", str(wheel),
                            "--no-measure"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out), "--wheel", str(wheel),
                            "--no-measure", "--force", "--tta", "--device", "cpu", "--amp", "bf16"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.py").is_file()
    progress = capsys.readouterr().out  # each step says what it does as it starts
    assert "m2dino.export: checkpoint" in progress and "m2dino.export: wheel" in progress, progress
    aside = list(tmp_path.glob(f"{out.name}.old-*"))  # --force moved the user's folder aside, never deleted it
    assert len(aside) == 1 and (aside[0] / "keep.txt").read_text() == "mine"
    settings = json.loads((out / "predictor.json").read_text())
    assert (settings["tta"], settings["device"], settings["amp"], settings["batch_size"]) == (True, "cpu", "bf16", 8)
    assert "Not measured" in (out / "README.md").read_text()

    # predict time: a data root without csv_files/ stops with a message and writes nothing
    import importlib.util

    spec = importlib.util.spec_from_file_location("exported_model", out / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "nowhere"), str(tmp_path / "predictions")]) == 2
    assert "has no csv_files/ folder" in capsys.readouterr().err and not (tmp_path / "predictions").exists()


@pytest.mark.slow
def test_real_wheel_build_installs_and_predicts(trained, tmp_path, child_venv):
    """The wheel built from this checkout holds m2dino (pure Python), installs into a fresh
    environment and the exported Model runs on it, the checkout off the path."""
    suite, checkpoint, folder = trained
    wheel = W.build_wheel(W.project_root(), tmp_path / "wheels")
    assert wheel.name.startswith("m2dino-") and wheel.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in ("m2dino/__init__.py", "m2dino/evaluation/predict.py", "m2dino/export/folder.py",
                 "m2dino/export/__main__.py", "m2dino/export/measure_child.py", "m2dino/export/entry/model.py",
                 *(f"m2dino/export/entry/{data}" for data in ENTRY_DATA),
                 "m2dino/evaluation/tta.py", "m2dino/fmuia_tasks.json", "m2dino/clinical_groups.json",
                 "m2dino_kernels/__init__.py", "m2dino_kernels/triton/moe.py"):
        assert name in names, name
    with zipfile.ZipFile(wheel) as archive:  # the package data byte for byte
        for data in ENTRY_DATA + ("model.py",):
            assert archive.read(f"m2dino/export/entry/{data}") == (ENTRY / data).read_bytes(), data
    assert not [n for n in names if n.endswith((".so", ".pyc")) or "__pycache__" in n]
    assert not (ROOT / "build").exists() or (ROOT / "build").stat().st_mtime < wheel.stat().st_mtime  # built elsewhere

    venv = tmp_path / "venv"
    python = child_venv(venv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(python), "-c", "import torch; print(torch.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, f"the child environment cannot import torch:\n{probe.stderr}"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, env=env, timeout=300)
    out = tmp_path / "predictions"
    proc = subprocess.run([str(python), "-c", CHILD, str(suite / "val"), str(out)], cwd=folder, capture_output=True,
                          text=True, timeout=600, env={**env, "PYTHONDONTWRITEBYTECODE": "1",
                                                       "M2DINO_KERNELS_BACKEND": "torch"})
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(child["m2dino"]).is_relative_to(venv)  # the installed wheel, not the checkout
    assert sum(child["counts"].values()) == sum(n for t, n in val_rows(suite).items() if t != UNKNOWN)

    # the exporter runs from the installed wheel too: the entry's files come from its package data
    again = tmp_path / "again"
    proc = subprocess.run([str(python), "-m", "m2dino.export", "--checkpoint", str(checkpoint), "--out", str(again),
                           "--wheel", str(wheel), "--no-measure"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for name in ("model.py", "Dockerfile", "requirements.txt"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    assert "DINOv3 License" in (again / "README.md").read_text()


# ------------------------------------------------ writing over no input, one export per folder, faults
def export_into(checkpoint, out, wheel, *extra):
    return export_cli.main(["--checkpoint", str(checkpoint), "--out", str(out), "--wheel", str(wheel), *extra])


def checksums(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_writes_over_none_of_its_inputs(trained, tmp_path, capsys):
    suite, checkpoint, folder = trained
    wheel = next((folder / "wheels").iterdir())
    run_dir = checkpoint.parent
    before = checksums(run_dir)
    for out, words in ((run_dir, "lies inside the output folder"), (run_dir.parent, "lies inside the output folder"),
                       (suite / "val" / "entry", "overlap"), (suite, "overlap")):
        assert export_into(checkpoint, out, wheel, "--force", "--measure", str(suite / "val")) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (out, err)
    assert checksums(run_dir) == before and not (suite / "val" / "entry").exists()


def test_one_export_per_folder(trained, tmp_path, capsys):
    _, checkpoint, folder = trained
    wheel = next((folder / "wheels").iterdir())
    out = tmp_path / "entry"
    holder = hold_lock(out)
    try:
        assert export_into(checkpoint, out, wheel, "--no-measure") == 2
        assert f"is being written by another process (pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert [p.name for p in out.iterdir()] == [".m2dino.lock"]
    assert export_into(checkpoint, out, wheel, "--no-measure") == 0  # the killed holder's lock went with it
    assert (out / "model.py").is_file() and not (out / ".m2dino.lock").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".entry.")]


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_export_on_a_read_only_or_full_disk(trained, tmp_path, monkeypatch, capsys, fault):
    _, checkpoint, folder = trained
    wheel = next((folder / "wheels").iterdir())
    disk = tmp_path / "disk"
    (read_only if fault == "read-only" else disk_full)(monkeypatch, disk)
    assert export_into(checkpoint, disk / "entry", wheel, "--no-measure") == 1
    err = capsys.readouterr().err
    words = "read-only file system" if fault == "read-only" else "the disk is full"
    assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    monkeypatch.undo()
    assert not disk.exists() or not any(disk.rglob("*"))  # nothing half-written, no staging left

