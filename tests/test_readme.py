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


def _performance_subsections() -> dict[str, str]:
    performance = README.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]
    parts = re.split(r"(?m)^### (.+)$", performance)
    return dict(zip(parts[1::2], parts[2::2]))


def test_one_current_table_per_benchmark_with_its_machine():
    # The README shows each benchmark's latest run, not the history of every run: one machine line per
    # subsection, and each bench script's results in one subsection (bench_score: one per budget).
    sections = _performance_subsections()
    for title, body in sections.items():
        assert body.count("\nMachine:") <= 1, f"{title}: more than one run's table"
        if "`bench_" in title:
            assert body.count("\nMachine:") == 1, f"{title}: no machine line"
    for script in sorted(p.name for p in (ROOT / "bench").glob("bench_*.py")):
        titles = [t for t in sections if f"`{script}`" in t]
        assert 1 <= len(titles) <= (2 if script == "bench_score.py" else 1), (script, titles)


def test_words_for_competitors_not_for_work_tracking():
    pattern = re.compile(r"\bissues?\b|\[\d/\d\]|#\d{2}\b", re.I)
    for path in [ROOT / "README.md", ROOT / "train_infer.py", *sorted((ROOT / "bench").glob("*.py"))]:
        hits = [line for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
        assert hits == [], (path.name, hits[:3])
    assert len(README.splitlines()) < 700                 # quick start, knobs and Kaggle workflow found fast
