"""The README stays true: every environment variable and CLI flag documented, CI runs its test command."""
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_environment_variable_is_documented_with_its_default():
    source = (ROOT / "train_infer.py").read_text(encoding="utf-8")
    names = set(re.findall(r'env_(?:int|float|bool|str|choice)\("([A-Z_]+)"', source))
    assert len(names) > 30
    for name in sorted(names):
        assert re.search(rf"^\| `{name}` \| [^|]+ \|", README, re.M), f"{name} is not in the README's table"


def test_tests_start_from_a_clean_slate_for_every_variable_the_script_reads():
    from conftest import SCRIPT_ENV_PREFIXES
    source = (ROOT / "train_infer.py").read_text(encoding="utf-8")
    names = set(re.findall(r'env_(?:int|float|bool|str|choice)\("([A-Z_]+)"', source))
    assert [n for n in sorted(names) if not n.startswith(SCRIPT_ENV_PREFIXES)] == []


def test_every_cli_flag_is_documented():
    parser_flags = set(re.findall(r'add_argument\("(--[a-z-]+)"', (ROOT / "train_infer.py").read_text()))
    for flag in parser_flags:
        assert f"`{flag}" in README, flag


def test_ci_runs_the_readme_test_command_verbatim():
    commands = re.findall(r"```bash\n(.+?)\n```", README, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()
    main_command = next(c for c in commands if "train_infer.py" in c)
    assert main_command.endswith("python train_infer.py")
