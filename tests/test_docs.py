"""The README and docs/ stay true to the code: their commands and their links work.

For README.md and every docs/*.md page:

- every command in a fenced shell block (```bash, sh, shell, console) that runs ``main.py``
  (directly, under torchrun or a ``torch.distributed`` launcher) uses only options of
  ``main.get_args_parser()``;
- every command that runs a ``tools/*.py`` or ``benchmarks/*.py`` script uses only options its
  ``--help`` lists (plus main.py's, for the tools that say they accept them);
- every repository path such a block names (configs/, tools/, benchmarks/, detection/, docs/)
  exists; placeholders such as ``/path/to/imagenet`` or ``output/...`` are not repository paths;
- every relative markdown link points to an existing file, and every ``#anchor`` into a .md file
  names one of its headings (GitHub's slugs) or an explicit ``<a id=...>`` anchor.

The scripts' ``--help`` outputs come from one helper process that runs each script with
``--help`` in turn, as ``python SCRIPT --help`` would from the repository root: the scripts
share their imports (torch, timm, the models), so this costs one start-up instead of one per
script and keeps this file within seconds.
"""
import json
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {'bash', 'sh', 'shell', 'console'}
REPO_PREFIXES = ('configs/', 'tools/', 'benchmarks/', 'detection/', 'docs/')
SCRIPT = re.compile(r'^(?:\./)?((?:tools|benchmarks)/[\w-]+\.py)$')
SEPARATORS = {'&&', '||', ';', '|', '&', '(', ')', ';;', '|&'}
FENCE = re.compile(r'^\s*(`{3,}|~{3,})\s*([\w+-]*)')
HEADING = re.compile(r'^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$')
HTML_ANCHOR = re.compile(r'<a\s+(?:id|name)="([^"]+)"', re.IGNORECASE)
INLINE_LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)')
REFERENCE_LINK = re.compile(r'^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+"[^"]*")?\s*$')
TAKES_MAIN_OPTIONS = 'every option of main.py'


def doc_files() -> List[Path]:
    return [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def display_name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


# ----------------------------------------------------------------------------------------------
# Markdown: fenced blocks, prose, headings
# ----------------------------------------------------------------------------------------------

@dataclass
class Block:
    language: str
    line: int  # 1-based line of the first line inside the fence
    lines: List[str]


def split_markdown(text: str) -> Tuple[List[Block], List[Tuple[int, str]]]:
    """The fenced code blocks, and the other lines (number, text)."""
    blocks, prose = [], []
    fence: Optional[Tuple[str, Block]] = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence = (match.group(1), Block(match.group(2).lower(), number + 1, []))
            else:
                prose.append((number, line))
        elif match and match.group(1)[0] == fence[0][0] and len(match.group(1)) >= len(fence[0]) \
                and not match.group(2):
            blocks.append(fence[1])
            fence = None
        else:
            fence[1].lines.append(line)
    if fence is not None:
        blocks.append(fence[1])
    return blocks, prose


def strip_inline_code(line: str) -> str:
    return re.sub(r'(`+)(.+?)\1', ' ', line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation but - and _ removed,
    spaces to hyphens."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)   # links: their text
    text = re.sub(r'<[^>]+>', '', text)                          # inline HTML
    text = text.replace('`', '').replace('*', '')
    text = text.strip().lower()
    text = ''.join(ch for ch in text if ch in ' -_' or unicodedata.category(ch)[0] in 'LN')
    return text.replace(' ', '-')


def anchors(path: Path) -> Set[str]:
    """The #anchors of a markdown file: heading slugs (repeats numbered as GitHub does) and
    explicit <a id/name> anchors."""
    _, prose = split_markdown(path.read_text(encoding='utf-8'))
    found: Set[str] = set()
    counts: Dict[str, int] = {}
    for _, line in prose:
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            seen = counts.get(slug, 0)
            counts[slug] = seen + 1
            found.add(slug if seen == 0 else f'{slug}-{seen}')
    return found


# ----------------------------------------------------------------------------------------------
# Shell commands
# ----------------------------------------------------------------------------------------------

def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a # that starts a word, outside quotes)."""
    quote = None
    for index, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in '\'"':
            quote = ch
        elif ch == '#' and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def command_lines(block: Block) -> Iterator[Tuple[int, str]]:
    """(line number, command) of a shell block: comments dropped, continuations joined, console
    prompts removed (console output lines skipped)."""
    pending, start = '', None
    for offset, raw in enumerate(block.lines):
        line = raw
        if block.language == 'console' and not pending:  # a new command needs a prompt
            if not re.match(r'^\s*\$ ', line):
                continue
            line = re.sub(r'^\s*\$ ', '', line, count=1)
        line = strip_comment(line).rstrip()
        if start is None:
            start = block.line + offset
        if line.endswith('\\'):
            pending += line[:-1] + ' '
            continue
        command = (pending + line).strip()
        if command:
            yield start, command
        pending, start = '', None
    if pending.strip():
        yield start, pending.strip()


def simple_commands(command: str) -> Iterator[List[str]]:
    """The words of each simple command of a command line (split at ;, &&, |, ...)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = ''
    words: List[str] = []
    for token in lexer:
        if token in SEPARATORS:
            if words:
                yield words
            words = []
        else:
            words.append(token)
    if words:
        yield words


def option_name(word: str) -> Optional[str]:
    """``--name`` of a word such as ``--name``, ``--name=value`` or ``[--name``; else None."""
    word = word.strip('[]')
    if not word.startswith('--') or word == '--':
        return None
    return word.split('=', 1)[0]


@dataclass
class Command:
    where: str          # file:line
    program: str        # 'main.py' or a script path such as 'tools/predict.py'
    options: List[str]


def commands_and_paths(path: Path) -> Tuple[List[Command], List[Tuple[str, str]]]:
    """The main.py and script invocations, and the repository paths named, in a file's shell blocks."""
    blocks, _ = split_markdown(path.read_text(encoding='utf-8'))
    commands, paths = [], []
    name = display_name(path)
    for block in blocks:
        if block.language not in SHELL_LANGUAGES:
            continue
        for line, command in command_lines(block):
            where = f'{name}:{line}'
            for words in simple_commands(command):
                for word in words:
                    for part in [word] + word.split('=', 1)[1:]:
                        part = part.strip('[]')
                        if part.startswith(REPO_PREFIXES) and not re.search(r'[*<>{}$]', part):
                            paths.append((where, part))
                for index, word in enumerate(words):
                    if word in ('main.py', './main.py'):
                        program = 'main.py'
                    elif SCRIPT.match(word):
                        program = SCRIPT.match(word).group(1)
                    else:
                        continue
                    options = [o for o in map(option_name, words[index + 1:]) if o]
                    commands.append(Command(where, program, options))
                    break
    return commands, paths


# ----------------------------------------------------------------------------------------------
# The programs' options
# ----------------------------------------------------------------------------------------------

HELP_RUNNER = r'''
import contextlib, io, json, os, runpy, sys, traceback
results = {}
for script in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [script, '--help']
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` does
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(script, run_name='__main__')
        results[script] = {'error': 'exited without --help ending it'}
    except SystemExit as stop:
        results[script] = {'help': out.getvalue()} if stop.code in (0, None) else \
            {'error': f'exit status {stop.code}: {out.getvalue()[-2000:]}'}
    except BaseException:
        results[script] = {'error': traceback.format_exc()[-2000:]}
    finally:
        sys.path.pop(0)
import main  # the repository root is the working directory and sys.path[0]
results['main.py'] = {'options': sorted(main.get_args_parser()._option_string_actions)}
sys.__stdout__.write(json.dumps(results))
'''


@pytest.fixture(scope='module')
def documented() -> Dict[str, list]:
    commands, paths = [], []
    for path in doc_files():
        file_commands, file_paths = commands_and_paths(path)
        commands += file_commands
        paths += file_paths
    return {'commands': commands, 'paths': paths}


@pytest.fixture(scope='module')
def program_options(documented) -> Dict[str, Set[str]]:
    """Option strings of main.py's parser (``main.get_args_parser()``) and of every documented
    script's --help, from one helper process run in the repository root."""
    scripts = sorted({c.program for c in documented['commands'] if c.program != 'main.py'})
    missing = [s for s in scripts if not (ROOT / s).is_file()]
    scripts = [s for s in scripts if s not in missing]
    run = subprocess.run([sys.executable, '-c', HELP_RUNNER, *scripts], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f'the --help helper failed:\n{run.stderr[-3000:]}'
    results = json.loads(run.stdout)
    main_options = set(results.pop('main.py')['options'])
    options = {'main.py': main_options}
    errors = []
    for script, result in results.items():
        if 'error' in result:
            errors.append(f'python {script} --help: {result["error"]}')
            continue
        found = set(re.findall(r'(?<![\w-])(--[A-Za-z0-9][\w-]*)', result['help']))
        if TAKES_MAIN_OPTIONS in result['help']:
            found |= main_options
        options[script] = found
    assert not errors, '\n'.join(errors)
    for script in missing:
        options[script] = set()
    return options


def unknown_options(commands: List[Command], options: Dict[str, Set[str]]) -> List[str]:
    problems = []
    for command in commands:
        if not (ROOT / command.program).is_file():
            problems.append(f'{command.where}: {command.program} does not exist')
            continue
        for option in command.options:
            if option not in options[command.program]:
                problems.append(f'{command.where}: {command.program} has no option {option}')
    return problems


def broken_links(path: Path) -> List[str]:
    """Relative links of a markdown file whose file or #anchor does not exist."""
    _, prose = split_markdown(path.read_text(encoding='utf-8'))
    problems = []
    name = display_name(path)
    for number, line in prose:
        text = strip_inline_code(line)
        targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
        for target in targets:
            if not target or re.match(r'^[a-z][a-z0-9+.-]*:', target, re.IGNORECASE):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition('#')
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f'{name}:{number}: {target}: {file_part} does not exist')
                continue
            if anchor and linked.suffix == '.md' and anchor not in anchors(linked):
                problems.append(f'{name}:{number}: {target}: no heading #{anchor} in {linked.name}')
    return problems


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_the_docs_have_commands(documented):
    """The extraction works: the docs run main.py, tools and benchmarks."""
    programs = {c.program for c in documented['commands']}
    assert 'main.py' in programs
    assert any(p.startswith('tools/') for p in programs)
    assert any(p.startswith('benchmarks/') for p in programs)
    launched = [c for c in documented['commands'] if c.program == 'main.py']
    assert len(launched) >= 10, launched


def test_documented_options_exist(documented, program_options):
    problems = unknown_options(documented['commands'], program_options)
    assert not problems, 'options the docs use that the programs do not have:\n' + '\n'.join(problems)


def test_documented_paths_exist(documented):
    problems = [f'{where}: {path} does not exist' for where, path in documented['paths']
                if not (ROOT / path).exists()]
    assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('path', doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors(path):
    problems = broken_links(path)
    assert not problems, '\n'.join(problems)


def test_the_checks_catch_mistakes(tmp_path):
    """A wrong option, a missing path, a dead link and a dead anchor are each reported."""
    (tmp_path / 'other.md').write_text('# Other page\n\n## Same\n\n## Same\n')
    page = tmp_path / 'page.md'
    page.write_text(
        '# Title: `code` & more\n\n'
        'See [ok](other.md#same-1), [self](#title-code--more), [bad file](missing.md), '
        '[bad anchor](other.md#nowhere), `[not a link](missing.md)`.\n\n'
        '```bash\n'
        'torchrun --nproc_per_node=8 main.py --model kw_resnet18 \\\n'
        '    --kw_config configs/nowhere.json --not_an_option 1  # --ignored\n'
        'KW_IMPL=gemm python tools/model_table.py --input_size 64 && python main.py --epochs=3\n'
        '```\n\n'
        '```console\n$ python main.py --eval true\nnot a --command\n```\n\n'
        '```python\nmain.py --python_is_not_shell\n```\n')
    commands, paths = commands_and_paths(page)
    assert [(c.program, c.options) for c in commands] == [
        ('main.py', ['--model', '--kw_config', '--not_an_option']),
        ('tools/model_table.py', ['--input_size']),
        ('main.py', ['--epochs']),
        ('main.py', ['--eval'])]
    options = {'main.py': {'--model', '--kw_config', '--epochs', '--eval'}, 'tools/model_table.py': {'--input_size'}}
    assert unknown_options(commands, options) == ['page.md:6: main.py has no option --not_an_option']
    assert [p for _, p in paths] == ['configs/nowhere.json', 'tools/model_table.py']
    assert not (ROOT / 'configs/nowhere.json').exists()
    assert github_slug('Title: `code` & more') == 'title-code--more'
    assert anchors(tmp_path / 'other.md') == {'other-page', 'same', 'same-1'}
    problems = broken_links(page)
    assert len(problems) == 2, problems
    assert 'missing.md does not exist' in problems[0] and 'no heading #nowhere' in problems[1]
