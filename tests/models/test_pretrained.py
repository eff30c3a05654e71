"""The weights check before a run (m2dino.models.pretrained): a file that would load strictly
passes in every accepted form, anything else is refused with the file and the problem named,
from the file's header alone; and the `pretrained` record a checkpoint keeps of where its
weights started."""
import hashlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from m2dino.models.backbone import M2DINOConfig
from m2dino.models.m2dino import create_model, load_model, save_model
from m2dino.models.pretrained import (
    FROM_SCRATCH,
    OFFICIAL_FILES,
    RELEASE_PAGE,
    check_weights_file,
    pretrained_record,
    read_shapes,
)
from m2dino.models.weights import WeightsError, build_backbone

TINY = M2DINOConfig(name="dinov3_tiny")


@pytest.fixture(scope="module")
def state():
    return {k: v.contiguous() for k, v in build_backbone("dinov3_tiny").state_dict().items()}


def test_every_accepted_form_passes_and_loads(state, tmp_path):
    files = {"plain.pth": state, "teacher.pth": {"teacher": {f"backbone.{k}": v for k, v in state.items()}}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    save_file(state, str(tmp_path / "plain.safetensors"))
    for path in sorted(tmp_path.iterdir()):
        check_weights_file(path, TINY)
        build_backbone("dinov3_tiny", weights=path)  # what the check promises: the strict load works


def test_a_file_of_another_shape_names_the_preset_it_fits(state, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"tiny.pth does not fit --model dinov3_vitb16 \(the file fits preset"
                                           r"\(s\) dinov3_tiny\).*wrong shapes") as err:
        check_weights_file(path, M2DINOConfig(name="dinov3_vitb16"))
    assert OFFICIAL_FILES["dinov3_vitb16"] in str(err.value) and RELEASE_PAGE in str(err.value)
    with pytest.raises(WeightsError, match=r"unexpected keys: blocks\.4"):  # the overrides count: 4 blocks, not 6
        check_weights_file(path, M2DINOConfig(name="dinov3_tiny", backbone_overrides={"depth": 4}))


def test_unusable_files_are_refused_naming_them(state, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({**state, "extra": Payload()}, tmp_path / "pickle.pth")
    save_file(state, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(state, tmp_path / "full.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:-200])
    cases = {"missing.pth": "does not exist", "pickle.pth": "refusing to load", "cut.safetensors": "not a readable",
             "cut.pth": "could not be read"}
    for name, problem in cases.items():
        with pytest.raises(WeightsError, match=problem) as err:
            check_weights_file(tmp_path / name, TINY)
        assert name in str(err.value)


@pytest.mark.slow
def test_the_check_reads_the_header_not_the_tensors(tmp_path):
    """A 512 MiB checkpoint is checked without its tensors entering memory (a full load would
    add them to the process's resident memory)."""
    path = tmp_path / "big.pth"
    torch.save({"w": torch.zeros(128, 1024, 1024)}, path)
    child = ("import sys, resource\n"
             "def rss(): return int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize()\n"
             "from m2dino.models.pretrained import read_shapes\n"
             "before = rss(); shapes = read_shapes(sys.argv[1]); after = rss()\n"
             "print(shapes['w'], (after - before) >> 20)\n")
    out = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, check=True).stdout
    shape, grown_mib = out.rsplit(" ", 1)
    assert shape == "(128, 1024, 1024)" and int(grown_mib) < 64, out
    assert read_shapes(path) == {"w": (128, 1024, 1024)}


def test_checkpoints_record_where_their_weights_started(state, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    save_file(state, str(weights))
    model = create_model("dinov3_tiny", ["lung"], pretrained=weights, moe_layers=1)
    record = {"file": "tiny.safetensors", "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
              "preset": "dinov3_tiny"}
    assert model.pretrained == record == pretrained_record(weights, "dinov3_tiny")
    save_model(model, tmp_path / "a")
    again = load_model(tmp_path / "a")
    assert again.pretrained == record  # carried on by a load and a save (the export does that)
    assert create_model("dinov3_tiny", ["lung"], moe_layers=1).pretrained == FROM_SCRATCH == "none"
    config = tmp_path / "a.json"  # a checkpoint written before the record: unknown, and it stays unknown
    text = config.read_text()
    config.write_text(text.replace(text[text.index(',\n  "pretrained"'):text.rindex("}")], "\n"))
    assert load_model(tmp_path / "a").pretrained is None
    save_model(load_model(tmp_path / "a"), tmp_path / "b")
    assert "pretrained" not in (tmp_path / "b.json").read_text()
