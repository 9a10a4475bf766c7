"""The README's commands are the ones CI runs."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_commands = [b for b in blocks if "pytest" in b]
    assert test_commands, "the README shows no test command"
    assert test_commands[0].strip() in ci.splitlines(), "'.ci/run' must run the README's test command verbatim"


def test_the_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)\n```", readme, flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_every_name_in_the_math_map_exists():
    """A reader holding the paper greps the math map's names: each `module.name` and `d.name` must exist."""
    import importlib

    from minidiff.diffusion import GaussianDiffusion

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Math map", 1)[1].split("\n## ", 1)[0]
    where = [row.split(" | ")[-1] for row in table.splitlines() if row.startswith("| ") and " | " in row]
    checked = 0
    for name in re.findall(r"`([A-Za-z_][\w.]*)`", "\n".join(where)):
        head, _, rest = name.partition(".")
        if not rest:
            continue   # a keyword value such as `fixed_large`
        if head == "d":
            owner = GaussianDiffusion
        elif head == "Trainer":
            owner = importlib.import_module("minidiff.train").Trainer
        else:
            owner = importlib.import_module(f"minidiff.{head}")
        for part in rest.split("."):
            assert hasattr(owner, part), f"the math map names {name}, which does not exist"
            owner = getattr(owner, part)
        checked += 1
    assert checked >= 30
