import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_api_reference_is_up_to_date(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "docs"))
    render = runpy.run_path(str(ROOT / "docs" / "make_api.py"))["render"]
    assert (ROOT / "docs" / "api.md").read_text() == render(), "run: python docs/make_api.py"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(?!#)(.+)$", readme.split("```bash")[1].split("```")[0], flags=re.M)
    assert len(commands) == 2
    test_command = commands[1].split("&&")[-1].strip()
    assert test_command == "python -m pytest -q"
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_docs_links_resolve():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+\.md)\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes split.pt2 where it runs
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert set(namespace["out"]) == {"left", "right"} and (tmp_path / "split.pt2").exists()


@pytest.mark.parametrize("section, framework", [("PyTorch Lightning", "lightning"),
                                                ("HuggingFace Trainer", "accelerate"), ("TensorBoard", "tensorboard")])
def test_the_training_guides_integration_examples_run(section, framework, tmp_path, monkeypatch):
    pytest.importorskip(framework, reason="the integrations are optional extras")
    monkeypatch.chdir(tmp_path)  # they write logs, checkpoints and reports where they run
    text = (ROOT / "docs" / "training.md").read_text().split(f"\n## {section}\n")[1].split("\n## ")[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", text, re.S))
    exec(compile(code, f"docs/training.md: {section}", "exec"), {})
