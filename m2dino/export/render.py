"""The entry's text files from the templates shipped in m2dino/export/entry/: the Dockerfile
(pure-Python wheel, or two stages that compile the kernels) and the README with the settings,
the tasks and the measured numbers. model.py is not rendered: it is copied as it is."""
from __future__ import annotations

from importlib import resources
from string import Template

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


def dockerfile_text(wheel_name: str, base_image: str, build_ext: bool, cuda_arches: str, version: str) -> str:
    if build_ext:
        return fill("Dockerfile.build-ext", version=version, base_image=base_image, wheel=wheel_name,
                    devel_image=devel_image(base_image), cuda_arches=cuda_arches)
    return fill("Dockerfile", version=version, base_image=base_image, wheel=wheel_name)


def devel_image(base_image: str) -> str:
    """The -devel image of the runtime image's torch and CUDA, where the kernels are compiled."""
    return base_image.replace("-runtime", "-devel")


def readme_text(settings: dict, meta: dict, measured: dict | None, build_ext: bool, base_image: str,
                cuda_arches: str) -> str:
    on_off = "on" if settings["tta"] else "off"
    numbers = measured_text(measured, settings["batch_size"], on_off) if measured else fill("readme-not-measured.md")
    kernels = (fill("readme-kernels-ext.md", devel_image=devel_image(base_image), cuda_arches=cuda_arches)
               if build_ext else fill("readme-kernels-pure.md"))
    task_lines = "\n".join(f"| {t['task_id']} | {t['task_type']} | {t['num_classes']} | "
                           f"{'yes' if t['hflip'] else 'no'} |" for t in settings["tasks"])
    return fill("README.md", version=meta["version"], exported_at=settings["exported_at"],
                source=settings["source_checkpoint"], sha=settings["source_sha256"][:16], wheel=meta["wheel"],
                device=settings["device"], batch_size=settings["batch_size"], amp=settings["amp"], tta=on_off,
                task_lines=task_lines, base_image=base_image, kernels=kernels.rstrip("\n"),
                numbers=numbers.rstrip("\n"))


def measured_text(m: dict, batch_size: int, tta: str) -> str:
    """The README's numbers from measure_run's result."""
    sizes = ("images of {}x{} to {}x{} px".format(*m["image_sizes"][0], *m["image_sizes"][1])
             if m.get("image_sizes") else "sizes of the data")
    return fill("readme-measured.md", rows=m["rows"], sizes=sizes, label=m["data_root_label"], batch_size=batch_size,
                tta=tta, backend=m["kernel_backend"], threads=m["threads"], torch=m["torch"], machine=m["machine"],
                per_image=f"{m['seconds_per_image'] * 1000:.1f}", median=f"{m['median_seconds_per_image'] * 1000:.1f}",
                passes=len(m["again_s"]), total=len(m["again_s"]) + 1, load=f"{m['load_average']:.1f}",
                warmup=f"{m['warmup_s']:.2f}", load_s=f"{m['load_s']:.2f}", imports=f"{m['import_s']:.2f}",
                wall=f"{m['wall_s']:.2f}", rss=f"{m['max_rss_kib'] / 1024:.0f}")
