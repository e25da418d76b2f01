"""The layout the code promises its readers: one concern per file, imports in one direction, and cpo_loss
readable in one screen. Line length is ruff's (.ci/run): a file that grows is split by concern, not squeezed.
Read with ast, so nothing here imports the files."""
import ast
import glob
import inspect
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "*.py")))
OURS = {os.path.basename(p)[:-3] for p in FILES}  # the top-level modules: what "a project import" means
# bench.py measures cold starts and peak memory: these run in a fresh process, which imports what it measures
FRESH_PROCESS_WORKERS = {"bench.py": {"_loss_worker", "_train_worker", "_shared_prompt_worker"}}
STANDALONE = ("common", "model", "cpo", "judge", "mauve", "charts")  # copyable alone: import nothing of ours
MAX_CPO_LOSS_LINES = 40


def project_imports(tree):
    """(module imported, the chain of enclosing function names) for every import of one of our files."""
    found = []

    def visit(node, funcs):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs = funcs + (node.name,)
        if isinstance(node, ast.Import):
            found.extend((a.name.split(".")[0], funcs) for a in node.names if a.name.split(".")[0] in OURS)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in OURS:
            found.append((node.module.split(".")[0], funcs))
        for child in ast.iter_child_nodes(node):
            visit(child, funcs)

    visit(tree, ())
    return found


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


IMPORTS = {os.path.basename(p)[:-3]: project_imports(parse(p)) for p in FILES}


def test_the_project_imports_form_no_cycle():
    graph = {mod: {m for m, _ in found if m != mod} for mod, found in IMPORTS.items()}
    done, path = set(), []

    def walk(mod):  # depth-first; a module met again on the current path closes a cycle
        if mod in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(mod):] + [mod]))
        if mod in done:
            return
        path.append(mod)
        for dep in sorted(graph[mod]):
            walk(dep)
        path.pop()
        done.add(mod)

    for mod in sorted(graph):
        walk(mod)


def test_no_project_import_inside_a_function():
    inside = [f"{mod}.py: {'.'.join(funcs)} imports {dep}"
              for mod, found in IMPORTS.items() for dep, funcs in found
              if funcs and not set(funcs) & FRESH_PROCESS_WORKERS.get(mod + ".py", set())]
    assert not inside, "project imports belong at the top of the file:\n" + "\n".join(inside)


@pytest.mark.parametrize("mod", STANDALONE)
def test_standalone_files_import_nothing_of_ours(mod):
    if mod not in IMPORTS:
        pytest.skip(f"{mod}.py does not exist (yet)")
    assert not {dep for dep, _ in IMPORTS[mod] if dep != mod}, f"{mod}.py must be copyable on its own"


def test_cpo_loss_fits_one_screen():
    import cpo  # the one import of ours in this file: inspect needs the live function

    n = len(inspect.getsource(cpo.cpo_loss).splitlines())
    assert n <= MAX_CPO_LOSS_LINES, f"cpo.cpo_loss is {n} lines, docstring included"


def test_readme_is_the_entry_and_every_relative_link_resolves():
    """README.md: under 16 KB (nanoGPT's is ~14), opening with the two commands (.ci/run runs the second);
    in it and in docs/*.md, every relative link names an existing file, and every #anchor a heading there."""
    import re  # this test alone reads markdown

    readme = os.path.join(ROOT, "README.md")
    assert os.path.getsize(readme) < 16 * 1024, f"README.md is {os.path.getsize(readme)} bytes"
    two_commands = ("```bash\npip install -r requirements.txt && python train.py\n"
                    "pip install -r requirements-dev.txt && python -m pytest -q\n```\n")
    assert open(readme, encoding="utf-8").read().startswith(two_commands), "README.md must open with them"

    def prose(path):  # the page without its code blocks
        return re.sub(r"```.*?```", "", open(path, encoding="utf-8").read(), flags=re.S)

    def anchors(path):  # GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens
        headings = re.findall(r"^#+ (.*)$", prose(path), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}

    broken = []
    for page in [readme] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(path) or (anchor and path.endswith(".md") and anchor not in anchors(path)):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)
