"""The Markdown a user reads agrees with the code: every repository path it quotes exists, every link
and anchor resolves, and every flag given to one of our commands is a flag that command accepts.

What is checked, in README.md, docs/*.md and the READMEs of slurm/, data/ and ds_configs/:

* paths in code (``launch/train.py``, ``ds_configs/zero3.json``, ``tests/test_disk.py``) that start at
  a top-level folder of the repository, and relative Markdown links, exist (placeholders such as
  ``runs/<run>`` or ``step_N`` are not paths and are skipped);
* links to ``FILE.md#anchor`` name a heading of that file;
* in each command line that runs one of our entry points (``launch/*.py``, ``python -m dreamprm...``,
  the console scripts of setup.py), every ``--flag`` after it is accepted by that entry point's parser;
* every flag quoted alone in inline code (```--meta_loss pairwise```) is a flag of some entry point of
  ours or of the launchers the docs use (deepspeed, torchrun, accelerate, srun/sbatch, mpirun, pytest).
"""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md",
        REPO / "data" / "README.md", REPO / "ds_configs" / "README.md"]
TOP = sorted(p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and p.name != "runs"
             ) + [".ci"]
# Flags of the third-party commands the docs show (launchers, schedulers, pytest, tensorboard, pip).
EXTERNAL_FLAGS = {
    "--num_gpus", "--num_nodes", "--hostfile", "--no_ssh", "--node_rank", "--master_addr", "--master_port",
    "--include", "--exclude", "--launcher", "--nproc_per_node", "--nnodes", "--standalone", "--rdzv_backend",
    "--rdzv_endpoint", "--rdzv_id", "--config_file", "--num_processes", "--num_machines", "--machine_rank",
    "--main_process_ip", "--main_process_port", "--bind-to", "--mpi", "--ntasks-per-node", "--nodes", "--signal",
    "--requeue", "--wait", "--gres", "--cpus-per-task", "--kill-on-bad-exit", "--output", "--error", "--time",
    "--partition", "--export", "--logdir", "--port", "--bind_all", "--durations", "--strict-markers", "--help",
    "--dependency", "--open-mode", "--job-name", "--mem", "--exclusive", "--ntasks", "--gpus-per-node",
    "--no-build-isolation", "--upgrade", "--index-url", "--extra-index-url", "--shutdown-timeout",
    "--signals-to-handle", "--oversubscribe",
}
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")


def docs() -> list[tuple[Path, str]]:
    return [(path, path.read_text(encoding="utf-8")) for path in DOCS if path.is_file()]


def code_spans(text: str) -> list[str]:
    """Fenced blocks (continuation lines joined) and inline code spans."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return lines + re.findall(r"`([^`\n]+)`", rest)


# ---------------------------------------------------------------- entry points and their flags
def _flags_of(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--")}


def entry_point_flags() -> dict[str, set[str]]:
    """Each entry point's spellings → the flags its parser accepts."""
    from dreamprm.bestofn.config import build_parser as bestofn_parser
    from dreamprm.clean import build_parser as clean_parser
    from dreamprm.config import build_parser as train_parser
    train, bestofn, clean = _flags_of(train_parser()), _flags_of(bestofn_parser()), _flags_of(clean_parser())
    from dreamprm.labeling.config import COMMANDS as LABEL_COMMANDS, build_parser as label_parser
    # dreamprm-label and its subcommands (merge, import-visualprm): a flag of any of them.
    label = set().union(*(_flags_of(label_parser(c)) for c in [None, *LABEL_COMMANDS]))
    table = {"launch/train.py": train, "dreamprm-train": train, "launch/bestofn.py": bestofn,
             "dreamprm.bestofn": bestofn, "dreamprm-bestofn": bestofn, "launch/clean.py": clean,
             "dreamprm.clean": clean, "dreamprm-clean": clean, "launch/label.py": label,
             "dreamprm.labeling": label, "dreamprm-label": label}
    # Scripts with their own argparse (and modules that import torch): the flags their source defines.
    tiny = REPO / "dreamprm" / "model" / "tiny.py"
    table["dreamprm-tiny-model"] = set(re.findall(r"""["'](--[a-zA-Z][\w-]*)["']""", tiny.read_text(encoding="utf-8")))
    for script in [*sorted((REPO / "launch").glob("*.py")), *sorted((REPO / "benchmarks").rglob("*.py"))]:
        name = str(script.relative_to(REPO))
        if name not in table:
            table[name] = set(re.findall(r"""["'](--[a-zA-Z][\w-]*)["']""", script.read_text(encoding="utf-8")))
    return table


def console_scripts() -> set[str]:
    return set(re.findall(r'"([\w-]+)=dreamprm[\w.:]+"', (REPO / "setup.py").read_text(encoding="utf-8")))


def command_problems(line: str, table: dict[str, set[str]]) -> list[str]:
    """Flags after one of our entry points, in one shell command, that it does not accept."""
    found = []
    for command in re.split(r"\|\||&&|[|;]", line):
        words = command.split()
        for i, word in enumerate(words):
            name = word.strip("'\"")
            if name.startswith("./"):
                name = name[2:]
            name = re.sub(r"^.*?(launch/|benchmarks/)", r"\1", name) if "/" in name else name
            if name in table:
                unknown = sorted({f.split("=")[0] for f in words[i + 1:] if FLAG.fullmatch(f.split("=")[0])}
                                 - table[name])
                found += [f"{name} {flag}" for flag in unknown]
                break
    return found


def all_problems() -> list[str]:
    table = entry_point_flags()
    known = set().union(*table.values()) | EXTERNAL_FLAGS
    problems = []
    for path, text in docs():
        where = path.relative_to(REPO)
        for span in code_spans(text):
            problems += [f"{where}: `{span.strip()[:80]}`: {p} is not a flag of it" for p in command_problems(span, table)]
            if span.lstrip().startswith("--"):
                problems += [f"{where}: `{span}`: no entry point has {flag}" for flag in FLAG.findall(span)
                             if flag not in known and not flag.startswith("--no-")]
            if "does not exist" not in span:  # a quoted error message names a missing file on purpose
                problems += [f"{where}: `{span.strip()[:80]}`: {p} does not exist" for p in missing_paths(span)]
        problems += [f"{where}: {p}" for p in link_problems(path, text)]
    return problems


# ---------------------------------------------------------------- paths and links
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])" % "|".join(re.escape(t) for t in TOP))


def missing_paths(span: str) -> list[str]:
    missing = []
    for match in PATH.finditer(span):
        path = match.group(1)
        end = match.end(1)
        if span[end:end + 1] in "<*{$" or re.search(r"(step_N|_N\b|\bN\b|/\.\.\.)", path):
            continue  # a placeholder (runs/<run>, step_N, tests/*.py), not a path
        if path.startswith("runs/") or path.startswith("data/") and not (REPO / path).exists() and "demo" not in path:
            continue  # outputs of a run, and a user's own data, are examples
        if not (REPO / path.rstrip("/")).exists():
            missing.append(path)
    return missing


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


def link_problems(path: Path, text: str) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"link ({target}): {file} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"link ({target}): no heading #{anchor} in {dest.name}")
    return problems


# ---------------------------------------------------------------- tests
def test_every_path_flag_and_link_in_the_docs_exists():
    problems = all_problems()
    assert not problems, "\n".join(problems)


def test_the_checker_finds_a_bad_flag_a_bad_path_and_a_bad_anchor(tmp_path):
    """The checker itself can fail: a doc with one mistake of each kind gives one problem each."""
    table = entry_point_flags()
    assert command_problems("python launch/train.py --train_json_file x --no_such_flag 1", table) == \
        ["launch/train.py --no_such_flag"]
    assert command_problems("dreamprm-clean --report r --drop 5% --out o", table) == []
    assert command_problems("python -m dreamprm.bestofn --prm p --weights_path w", table) == \
        ["dreamprm.bestofn --weights_path"]
    assert missing_paths("see ds_configs/zero9.json and ds_configs/zero3.json") == ["ds_configs/zero9.json"]
    assert missing_paths("runs/<run>/export and checkpoints/step_N") == []
    doc = tmp_path / "x.md"
    doc.write_text("# A title\n[ok](x.md#a-title) [bad](x.md#no-such) [gone](nothing.md)\n")
    problems = link_problems(doc, doc.read_text())
    assert len(problems) == 2 and "#no-such" in problems[0] and "nothing.md does not exist" in problems[1], problems


def test_console_scripts_are_all_checked():
    """A console script added to setup.py must have its parser in the table above."""
    assert console_scripts() <= set(entry_point_flags()), console_scripts() - set(entry_point_flags())


def test_demo_record_counts_in_data_readme_match_the_files():
    import collections
    import json
    text = (REPO / "data" / "README.md").read_text(encoding="utf-8")
    train = json.loads((REPO / "data" / "demo" / "train.json").read_text())
    counts = collections.Counter(r["dataset"] for r in train)
    for domain, n in counts.items():
        assert re.search(rf"\| train: `{domain}`\s*\|\s*\d+\s*\|\s*{n}\s*\|", text), f"{domain}: {n} records"
    assert re.search(rf"\| train total\s*\|\s*\d+\s*\|\s*{len(train)}\s*\|", text), f"total {len(train)}"
