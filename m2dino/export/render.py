"""The entry's text files from the templates shipped in m2dino/export/entry/: the Dockerfile
(pure-Python wheel, or two stages that compile the kernels) and the README with the settings,
the tasks, the licences the weights' `pretrained` record calls for, and the measured numbers.
model.py is not rendered: it is copied as it is."""
from __future__ import annotations

import re
import textwrap
from importlib import resources
from string import Template

from m2dino.models.pretrained import FROM_SCRATCH, describe_record

ENTRY = resources.files("m2dino.export.entry")


def entry_text(name: str) -> str:
    """A file of m2dino/export/entry/ as text."""
    return ENTRY.joinpath(name).read_text(encoding="utf-8")


def fill(name: str, **values) -> str:
    """The template `name` with every ${placeholder} filled (a missing value is a KeyError:
    the templates and this module must agree)."""
    return Template(entry_text(name)).substitute(values)


def model_py() -> str:
    return entry_text("model.py")


def dockerfile_text(wheel_name: str, base_image: str, build_ext: bool, cuda_arches: str, version: str,
                    pretrained=None) -> str:
    """The Dockerfile; pretrained: the checkpoint's `pretrained` record (its licence comment
    and label follow it)."""
    licence = {"licence_comment": comment(licence_text(pretrained)), "licences": licence_label(pretrained)}
    if build_ext:
        return fill("Dockerfile.build-ext", version=version, base_image=base_image, wheel=wheel_name,
                    devel_image=devel_image(base_image), cuda_arches=cuda_arches, **licence)
    return fill("Dockerfile", version=version, base_image=base_image, wheel=wheel_name, **licence)


def devel_image(base_image: str) -> str:
    """The -devel image of the runtime image's torch and CUDA, where the kernels are compiled."""
    return base_image.replace("-runtime", "-devel")


def licence_text(pretrained) -> str:
    """The licences of the entry's code and weights, as the weights' `pretrained` record has it:
    fine-tuned from DINOv3 weights (the DINOv3 License), from random weights (not Meta's), or
    not recorded (the DINOv3 License if they were)."""
    if pretrained == FROM_SCRATCH:
        return fill("licence-scratch.md")
    if isinstance(pretrained, dict):
        return fill("licence-dinov3.md", file=pretrained.get("file"), preset=pretrained.get("preset"),
                    sha=str(pretrained.get("sha256"))[:16])
    return fill("licence-unknown.md")


def licence_label(pretrained) -> str:
    """The image's org.opencontainers.image.licenses (SPDX): the code's, and DINOv3's unless the
    weights are recorded as trained from scratch."""
    return "Apache-2.0" if pretrained == FROM_SCRATCH else "Apache-2.0 AND LicenseRef-DINOv3-License"


def comment(markdown: str) -> str:
    """A Markdown paragraph as Dockerfile comment lines (links written out, code marks dropped)."""
    plain = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (\2)", " ".join(markdown.split())).replace("`", "")
    return "\n".join("# " + line for line in textwrap.wrap(plain, width=96, break_on_hyphens=False))


def readme_text(settings: dict, meta: dict, measured: dict | None, build_ext: bool, base_image: str,
                cuda_arches: str) -> str:
    on_off = "on" if settings["tta"] else "off"
    numbers = measured_text(measured, settings["batch_size"], on_off) if measured else fill("readme-not-measured.md")
    kernels = (fill("readme-kernels-ext.md", devel_image=devel_image(base_image), cuda_arches=cuda_arches)
               if build_ext else fill("readme-kernels-pure.md"))
    task_lines = "\n".join(f"| {t['task_id']} | {t['task_type']} | {t['num_classes']} | "
                           f"{'yes' if t['hflip'] else 'no'} |" for t in settings["tasks"])
    pretrained = settings.get("pretrained")
    return fill("README.md", version=meta["version"], exported_at=settings["exported_at"],
                source=settings["source_checkpoint"], sha=settings["source_sha256"][:16], wheel=meta["wheel"],
                provenance=describe_record(pretrained), licence=licence_text(pretrained).rstrip("\n"),
                device=settings["device"], batch_size=settings["batch_size"], amp=settings["amp"], tta=on_off,
                task_lines=task_lines, base_image=base_image, kernels=kernels.rstrip("\n"),
                numbers=numbers.rstrip("\n"))


BUSY_LOAD = 0.5  # a load average above this share of the cores: the machine was busy


def measured_text(m: dict, batch_size: int, tta: str) -> str:
    """The README's numbers from measure_run's result."""
    sizes = ("images of {}x{} to {}x{} px".format(*m["image_sizes"][0], *m["image_sizes"][1])
             if m.get("image_sizes") else "sizes of the data")
    cores = m.get("cores") or 1
    busy = max(m["load_average_before"], m["load_average"]) > BUSY_LOAD * cores
    busy_note = (": the machine was busy, so these times are likely higher than on an idle machine (export "
                 "again there for a figure to quote)") if busy else ""
    return fill("readme-measured.md", rows=m["rows"], sizes=sizes, label=m["data_root_label"], batch_size=batch_size,
                tta=tta, backend=m["kernel_backend"], threads=m["threads"], torch=m["torch"], machine=m["machine"],
                per_image=_ms(m["seconds_per_image"]), fastest=_ms(m["fastest_seconds_per_image"]),
                slowest=_ms(m["slowest_seconds_per_image"]), passes=len(m["again_s"]), total=len(m["again_s"]) + 1,
                load_before=f"{m['load_average_before']:.1f}", load=f"{m['load_average']:.1f}", cores=cores,
                busy=busy_note, warmup=f"{m['warmup_s']:.2f}", load_s=f"{m['load_s']:.2f}",
                imports=f"{m['import_s']:.2f}", wall=f"{m['wall_s']:.2f}", rss=f"{m['max_rss_kib'] / 1024:.0f}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"
