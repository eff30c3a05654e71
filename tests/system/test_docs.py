"""The documentation holds: every `python -m m2dino...` flag that README.md and docs/ name exists
in that command's parser, every run-directory file they name is one the code writes (under the
condition they state), and the Python blocks of docs/ run, on the tiny preset."""
import re
from pathlib import Path

import pytest
from parsers import parser_of

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"-m (m2dino(?:\.[a-z_]+)+)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def commands_in(text: str):
    """(command, its flags) for every command line in code blocks and inline code; a line ending
    in a backslash continues."""
    snippets = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    for snippet in snippets:
        for line in snippet.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0]
            for part in re.split(r"&&|\|", line):
                found = COMMAND.search(part)
                if found:
                    yield found.group(1), FLAG.findall(part[found.end():])


def test_the_pages_exist_and_the_readme_is_short():
    names = {p.name for p in PAGES}
    assert {"getting-started.md", "data.md", "training.md", "study.md", "python-api.md", "export.md", "kernels.md",
            "troubleshooting.md"} <= names
    assert len((ROOT / "README.md").read_bytes()) <= 12 * 1024


def test_every_flag_the_docs_name_exists():
    options = {}
    seen = 0
    for page in PAGES:
        for command, flags in commands_in(page.read_text()):
            if command not in options:
                options[command] = {s for a in parser_of(command)._actions for s in a.option_strings}
            for flag in flags:
                seen += 1
                assert flag in options[command], f"{page.name}: {command} has no {flag}"
    assert seen > 30 and {"m2dino.train", "m2dino.predict", "m2dino.export"} <= set(options)


def test_the_training_page_names_only_trains_options():
    """Its option table names flags without the command in front of them."""
    text = (ROOT / "docs" / "training.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `--"))
    options = {s for a in parser_of("m2dino.train")._actions for s in a.option_strings}
    named = set(FLAG.findall(table))
    assert len(named) > 40
    assert named <= options, sorted(named - options)


RUN_FILES = ("config.yaml", "split.json", "excluded_rows.json", "skipped_rows.json", "best.safetensors", "best.json",
             "metrics.jsonl", "eval.json", "eval_per_image.json", "routing.json", "metrics.json", "report.md",
             "report.csv", "report.json", "plan.json", "tensorboard")


def test_every_run_directory_file_named_is_one_the_code_writes():
    tree = (ROOT / "docs" / "training.md").read_text().split("runs/default/\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"[a-z_]+\.(?:yaml|json|jsonl|safetensors|md|csv)|tensorboard", tree))
    assert named <= set(RUN_FILES), sorted(named - set(RUN_FILES))
    source = "\n".join(p.read_text() for p in (ROOT / "m2dino").rglob("*.py"))
    for name in RUN_FILES:
        stem, dot, ext = name.partition(".")
        assert f'"{name}"' in source or (dot and f'"{ext}"' in source and f'"{stem}' in source) \
            or f'"{stem}"' in source, f"no code writes {name}"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from m2dino.data.synthetic.suite import write_suite

    root = tmp_path_factory.mktemp("suite")
    write_suite(root, 0.01, 0, tasks=["fetal_head", "breast_2cls"], min_train=8, min_val=4, workers=1)
    return root


def test_split_json_only_without_val_and_skipped_rows_only_with_skip(tiny_root, tmp_path):
    """As docs/data.md and docs/training.md state it."""
    from m2dino.data.fmuia import load_fmuia

    with_val, without_val = tmp_path / "a", tmp_path / "b"
    load_fmuia(tiny_root, policy="error", run_dir=with_val)
    assert not (with_val / "split.json").exists() and not (with_val / "skipped_rows.json").exists()
    load_fmuia(tiny_root / "train", policy="skip", run_dir=without_val)
    assert (without_val / "split.json").is_file() and (without_val / "skipped_rows.json").is_file()


def python_blocks():
    for page in sorted((ROOT / "docs").glob("*.md")):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            yield pytest.param(block, id=f"{page.stem}-{i}")


@pytest.mark.parametrize("block", list(python_blocks()))
def test_the_python_blocks_of_the_docs_run(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a block writes lands here
    exec(compile(block, "<docs>", "exec"), {"__name__": "__docs__"})


# ------------------------------------------------------------------ the pages agree with the code and each other

ENTRY = ROOT / "m2dino" / "export" / "entry"
TEXTS = PAGES + sorted(ENTRY.glob("*.md")) + sorted(ENTRY.glob("Dockerfile*"))


def test_one_install_command_everywhere():
    """Every install of this checkout is `pip install --no-build-isolation -e ...` (an isolated
    build compiles the kernels against another torch)."""
    seen = 0
    for page in PAGES:
        for line in page.read_text().splitlines():
            for command in re.findall(r"pip install[^`&|\n]*", line):
                if re.search(r"\s-e\s|\s-e$|\s\.(\s|$)|'\.\[", command + " "):
                    seen += 1
                    assert "--no-build-isolation" in command, f"{page.name}: {command}"
    assert seen >= 6


def test_the_kernel_backend_has_one_name():
    """`reference` is the plain-PyTorch backend; `torch` appears only as its old alias."""
    old_name = re.compile(r"`torch` (kernel )?backend|BACKEND=torch|backend=\"torch\"|backend='torch'")
    for page in TEXTS:
        text = page.read_text()
        assert not old_name.search(text), f"{page.name}: {old_name.search(text).group(0)}"


def test_every_section_starts_with_a_sentence():
    """No section opens mid-sentence (a paragraph's start lost in an edit)."""
    for page in PAGES:
        lines = page.read_text().splitlines()
        in_code = False
        for i, line in enumerate(lines):
            in_code ^= line.startswith("```")
            if in_code or not line.startswith("#") or page.name == "README.md" and i == 0:
                continue
            following = next((n for n in lines[i + 1:] if n.strip()), "")
            assert re.match(r"[A-Z0-9`|\[<*\-(\"]|```", following), f"{page.name}: {line!r}, then {following!r}"


def test_relative_links_lead_to_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: link to {target}"


DATE = re.compile(r"20\d\d-\d\d-\d\d|\d{1,2} (January|February|March|April|May|June|July|August|September|October|"
                  r"November|December) 20\d\d")
COMMIT = re.compile(r"commit [0-9a-f]{7,40}\b")


def sections(text: str) -> list[str]:
    return re.split(r"\n(?=#{2,3} )", text)


def quotes_measurements(block: str) -> bool:
    """A table or an output block of measured numbers: several decimal numbers."""
    return len(re.findall(r"(?<![\w.])[+-]?\d+\.\d{1,4}(?![\w.])", block)) >= 6


def test_measured_numbers_state_their_commit_and_date():
    """A number quoted from a run names the commit and the date of that run: a table or an
    output block of numbers in its section, a bullet of README's results in the bullet."""
    checked = 0
    for page in PAGES:
        # the option table is generated from the declarations: defaults, not measurements
        text = re.sub(r"<!-- option table: .*?<!-- end of the option table -->", "", page.read_text(), flags=re.S)
        for section in sections(text):
            blocks = re.findall(r"```\n.*?```", section, re.S) + re.findall(r"(?:^\|.*\n)+", section, re.M)
            if any(quotes_measurements(b) for b in blocks):
                checked += 1
                assert COMMIT.search(section) and DATE.search(section), f"{page.name}: {section[:80]!r}"
    assert checked >= 3
    results = sections((ROOT / "README.md").read_text())
    bullets = next(s for s in results if s.startswith("## Results so far")).split("\n- ")[1:]
    for bullet in bullets:
        if re.search(r"\d+(\.\d+)? ?(ms|s|min|%|x)\b", bullet):
            assert COMMIT.search(bullet) and DATE.search(bullet), f"README results: {bullet[:80]!r}"


def test_no_message_sends_a_user_to_a_file_they_may_not_have():
    """The exported image holds no README or docs: the messages m2dino prints name none."""
    for source in sorted((ROOT / "m2dino_kernels").rglob("*.py")) + sorted((ROOT / "m2dino").rglob("*.py")):
        text = source.read_text()
        assert "(see README.md)" not in text and "see the README" not in text, source.name
