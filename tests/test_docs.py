"""The docs match the code: every code block of the README and docs/ runs as written (python and bash blocks run,
yaml config snippets parse layered on the tiny curriculum), and the generated sections (memory tables, benchmark
figures) are what their tools render now.

A block that cannot run here is marked in the markdown, right above it, with `<!-- doc-test: skip WHY -->`; the test
reports it as skipped with that reason. Blocks run in document order in one sandbox folder (the repository's
experiments/, a copy of examples/, a small ShapeWorld as data/shapeworld and a stage-3 checkpoint of the tiny
preset as runs/tiny/stage3/last.ckpt), so a block can use what an earlier one wrote (`cologen export` then the
pipeline)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)\s*$")
SKIP = re.compile(r"^<!-- doc-test: skip (.+) -->$")
RUN = ("python", "bash", "yaml")
NOT_CODE = ("text", "json")  # output listings and format sketches


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}:{self.lang}"


def blocks(path: Path) -> list[Block]:
    out, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(previous.strip())
        out.append(Block(str(path.relative_to(ROOT)), start + 1, lang, "\n".join(body) + "\n",
                         skip.group(1) if skip else None))
        i += 1
    return out


ALL = [b for doc in DOCS for b in blocks(doc)]


def test_every_block_says_what_it_is():
    untagged = [b.id for b in ALL if b.lang not in RUN + NOT_CODE]
    assert not untagged, f"tag these blocks with one of {RUN + NOT_CODE}: {untagged}"
    assert all(b.lang in RUN for b in ALL if b.skip), "a skip mark belongs above a block that would run"


# --------------------------------------------------------------------------------------------------- sandbox
def stage3_checkpoint(path: Path) -> None:
    """A checkpoint of the tiny preset as experiments/tiny/curriculum.yaml configures it, every expert active (the
    state after stage 3), trained for one step."""
    from cologen.module import CoLoGenModule

    module = CoLoGenModule(**yaml.safe_load((ROOT / "experiments/tiny/curriculum.yaml").read_text())["model"])
    while module.model.num_active < module.prw_config.num_experts:
        module.model.activate_next_expert()
    module.model.set_entry_progress(1.0)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    batch = {"target": t, "source": t.flip(-1), "has_source": torch.ones(2, dtype=torch.bool),
             "prompt": ["make the red square blue", "make the circle green"], "task": ["editing", "editing"]}

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader([batch], batch_size=None)

    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=path.parent)
    trainer.fit(module, datamodule=Data())
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, shapeworld_dir):
    box = tmp_path_factory.mktemp("docs")
    os.symlink(ROOT / "experiments", box / "experiments")
    shutil.copytree(ROOT / "examples", box / "examples", ignore=shutil.ignore_patterns("*_outputs"))
    (box / "data").mkdir()
    os.symlink(shapeworld_dir, box / "data" / "shapeworld")
    (box / "runs" / "tiny" / "stage3").mkdir(parents=True)
    stage3_checkpoint(box / "runs" / "tiny" / "stage3" / "last.ckpt")
    return box


def commands(code: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    out, current = [], ""
    for line in code.splitlines():
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            if shlex.split(current, comments=True):
                out.append(current)
            current = ""
    return out


def run_bash(code: str, cwd: Path) -> None:
    from cologen.cli import main as cologen

    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for command in commands(code):
        argv = shlex.split(command, comments=True)
        if argv[0] == "cologen":  # the console script is `cologen.cli:main`: run it here (no new interpreter)
            try:
                cologen(argv[1:])
            except SystemExit as exit:
                assert exit.code in (0, None), f"`{command}` exited {exit.code}"
        else:
            proc = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
            assert proc.returncode == 0, f"`{command}` exited {proc.returncode}: {proc.stderr[-3000:]}"


def check_yaml(code: str, cwd: Path, tmp_path: Path, capfd) -> None:
    """A config snippet is valid where it claims to be: layered on the tiny curriculum, it parses."""
    from cologen.cli import main as cologen

    snippet = tmp_path / "snippet.yaml"
    snippet.write_text(code)
    yaml.safe_load(code)
    with pytest.raises(SystemExit) as exit:
        cologen(["fit", "--config", str(ROOT / "experiments/tiny/curriculum.yaml"), "--config", str(snippet),
                 "--print_config"])
    assert exit.value.code in (0, None), capfd.readouterr().err[-3000:]


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("block", [b for b in ALL if b.lang in RUN], ids=lambda b: b.id)
def test_code_block_runs_as_written(block, sandbox, monkeypatch, tmp_path, capfd):
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    monkeypatch.chdir(sandbox)
    if block.lang == "python":
        exec(compile(block.code, block.id, "exec"), {"__name__": "__doc_block__"})
    elif block.lang == "bash":
        run_bash(block.code, sandbox)
    else:
        check_yaml(block.code, sandbox, tmp_path, capfd)


# ------------------------------------------------------------------------------------------ generated sections
def test_generated_sections_render_and_report_staleness(tmp_path):
    from cologen.docgen import render, sections_in, stale, update

    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- generated:a.table by `tool --write-docs` -->\nold\n<!-- /generated:a.table -->\nend\n")
    assert sections_in(doc.read_text()) == {"a.table": "old\n"}
    assert stale(doc, {"a.table": "old"}) == [] and stale(doc, {"a.table": "| new |"}) == ["a.table"]
    assert update(doc, {"a.table": "| new |"}) == ["a.table"]
    assert doc.read_text() == ("intro\n<!-- generated:a.table by `tool --write-docs` -->\n| new |\n"
                               "<!-- /generated:a.table -->\nend\n")
    with pytest.raises(KeyError, match="no generated section"):
        render(doc.read_text(), {"b.table": "x"})


def test_benchmark_figures_in_the_docs_are_the_committed_results():
    from benchmarks import docs
    from cologen.docgen import stale

    for doc, texts in docs.sections(docs.load()).items():
        assert stale(ROOT / doc, texts) == [], f"{doc} disagrees with {docs.RESULTS.name}: run `{docs.COMMAND}`"


@pytest.mark.timeout(3600)
def test_memory_tables_are_what_the_tool_computes():
    from benchmarks.memory import COMMAND, DOC, doc_sections, plan
    from cologen.docgen import stale

    names = stale(ROOT / DOC, doc_sections(plan()))
    assert names == [], f"{DOC} sections {names} disagree with the tool: run `{COMMAND}`"


def test_every_image_the_docs_show_is_committed():
    """A README or docs page that shows a picture shows one the repository holds (paths relative to the page)."""
    missing = []
    for doc in DOCS:
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).is_file():
                missing.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not missing, missing
