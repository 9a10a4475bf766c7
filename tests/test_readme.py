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
