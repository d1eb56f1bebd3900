"""The README's shell examples run as written (issue: "a README that is tested").

Every indented command line of README.md that calls `.venv/bin/stardomain` (or loops over it) is run in a
temporary folder, in README order, with tiny settings: the MNIST config becomes a 1-epoch digits config and
the default study gets a small population. Optional parts shown in [brackets] are left out; examples that
need data or packages this machine cannot have (CIFAR, a user's own package) are skipped.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = "data: {name: digits}\nmodel: {name: mlp, kwargs: {width: 8}}\ntrain: {epochs: 1, batch_size: 64}\n"
TRANSFORMER_TINY = ("--set data.train_subset=96 --set train.epochs=1 --set star.train.epochs=1 --set study.n_sources=2 "
                    "--set study.n_heldouts=1 --set 'study.sweeps.n_sources=[2]' --set study.eval.points=3 "
                    "--set study.eval.examples=32 --set model.kwargs.depth=1")
STUDY_TINY = ("--set data.name=digits --set train.epochs=1 --set star.train.epochs=1 --set study.n_sources=2 "
              "--set study.n_heldouts=2 --set 'study.sweeps.n_sources=[]' --set study.bma=false")
UNAVAILABLE = ("cifar", "mypkg", "hf-model-folder")


def readme_commands() -> list[str]:
    """The README's shell command lines (continuations joined), comments and [optional parts] removed."""
    lines, out = README.read_text().splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"^    (\.venv/bin/stardomain|for s in)", line):
            cmd = line.strip()
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            cmd = re.sub(r"\s+#.*$", "", cmd)
            cmd = re.sub(r"\s\[[^\]]*\]", "", cmd)
            if not any(word in cmd for word in UNAVAILABLE):
                out.append(cmd)
        i += 1
    return out


def test_readme_lists_the_examples_this_test_runs():
    cmds = readme_commands()
    for verb in ("train", "info", "eval", "star", "barrier", "run", "spec", "align", "bma"):
        assert any(f"stardomain {verb} " in c for c in cmds), verb


@pytest.mark.slow
def test_readme_shell_examples_run_as_written(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mnist_mlp.yaml").write_text(TINY)
    for name in ("text_gpt", "mnist_vit"):  # the shipped studies, shrunk by --set only
        (tmp_path / "configs" / f"{name}.yaml").write_text((README.parent / "configs" / f"{name}.yaml").read_text())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in readme_commands():
        cmd = cmd.replace(".venv/bin/stardomain", f'"{sys.executable}" -m stardomain')
        if re.search(r"stardomain run --out", cmd):
            cmd += " " + STUDY_TINY
        if re.search(r"stardomain run configs/(text_gpt|mnist_vit)", cmd):
            cmd += " " + TRANSFORMER_TINY
        res = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{cmd}\n{res.stderr[-2000:]}"
    assert (tmp_path / "runs" / "default" / "results.json").is_file()
    assert (tmp_path / "runs" / "text_gpt" / "report.md").is_file() and (tmp_path / "runs" / "mnist_vit" / "report.md").is_file()
    assert (tmp_path / "runs" / "star_h0.png").is_file() and (tmp_path / "runs" / "s1_to_s0.safetensors").is_file()


OWN_LOOP = "## Train a star in your own loop"


def readme_python(section: str) -> list[str]:
    """The ```python blocks of one README section, in order."""
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_readme_own_loop_section_shows_the_plain_loop_lightning_and_the_trainer():
    blocks = readme_python(OWN_LOOP)
    assert len(blocks) == 3
    assert "sd.Starlight(" in blocks[0] and "StarlightCallback(" in blocks[1] and "StarlightTrainer(" in blocks[2]


@pytest.mark.slow
def test_readme_own_loop_examples_run_as_written(tmp_path):
    """The three blocks run in order in one fresh interpreter (later blocks use the first one's names)."""
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    code = "\n\n".join(readme_python(OWN_LOOP))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.strip().splitlines()[0]) >= 0
