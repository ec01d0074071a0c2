"""Build gsq's default calibration mix (`src/gsq/data/bundled/mix/*.txt.gz`) from its sources,
and the held-out evaluation texts of the same kinds (`benchmarks/data/eval-*.txt.gz`).

The sources and their licences are listed in `src/gsq/data/bundled/mix/README.md` and
`benchmarks/data/README.md`; this script only selects, cleans and compresses them,
deterministically:

    python tools/build_calib_mix.py --peps PEPS_REPO/peps --factbook FACTBOOK_JSON_REPO \
        --shakespeare tinyshakespeare.txt --stdlib /usr/lib/python3.11 \
        --fiction pg2641.txt --out src/gsq/data/bundled/mix --eval-out benchmarks/data
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import re
from pathlib import Path

# CPython standard-library modules of the `code` part: plain Python of many styles, no tests
STDLIB_MODULES = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "configparser.py", "contextlib.py", "csv.py", "dataclasses.py", "datetime.py",
    "difflib.py", "enum.py", "fractions.py", "functools.py", "gettext.py", "glob.py",
    "heapq.py", "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py",
    "logging/__init__.py", "pathlib.py", "pprint.py", "queue.py", "random.py", "shlex.py",
    "shutil.py", "statistics.py", "string.py", "textwrap.py", "typing.py", "uuid.py",
    "zipfile.py",
)
# standard-library modules of the held-out `code` evaluation text (none of them in the mix)
EVAL_STDLIB_MODULES = (
    "email/_header_value_parser.py", "email/message.py", "http/client.py", "http/cookiejar.py",
    "asyncio/base_events.py", "asyncio/tasks.py", "tarfile.py", "smtplib.py", "imaplib.py",
)
PEP_BYTES = 900_000  # technical prose: PEPs in number order (every second one) up to this size
EVAL_BYTES = 400_000  # each held-out evaluation text
FACTBOOK_MIN_CHARS = 120  # encyclopedic: Factbook text fields at least this long,
FACTBOOK_ARTICLE_CHARS = 3_500  # about this much per country, fields in the file's order
CODE_BYTES = 700_000  # code: the modules below, in order, up to this size
PUBLIC_DOMAIN = ("placed in the public domain", "CC0-1.0-Universal")


def _write(out: Path, name: str, text: str) -> None:
    text = text.strip() + "\n"
    with gzip.GzipFile(out / f"{name}.txt.gz", "wb", mtime=0) as f:  # mtime 0: same bytes
        f.write(text.encode("utf-8"))
    print(f"{name}: {len(text):,} chars")


def technical(peps: Path, first: int = 0, limit: int = PEP_BYTES) -> str:
    """PEPs whose copyright section puts them in the public domain (or CC0), headers dropped:
    every second one from `first` (0: the mix, 1: the held-out evaluation text)."""
    parts, size = [], 0
    files = sorted(peps.glob("pep-*.rst"), key=lambda p: int(re.sub(r"\D", "", p.stem)))
    for path in files[first::2]:
        text = path.read_text(encoding="utf-8")
        if not any(marker in text for marker in PUBLIC_DOMAIN) or len(text) > 120_000:
            continue
        body = text.split("\n\n", 1)[1] if text.startswith("PEP:") else text  # the RFC header
        body = body.split("\nCopyright\n=========")[0]
        parts.append(body.strip())
        size += len(body)
        if size >= limit:
            break
    return "\n\n".join(parts)


def _strings(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, key))
    elif isinstance(node, str):
        yield path, node


def _plain(markup: str) -> str:
    text = re.sub(r"<br\s*/?>", "\n", markup)
    return html.unescape(re.sub(r"<[^>]+>", "", text)).strip()


def encyclopedic(factbook: Path) -> str:
    """One article per country of the World Factbook: its longer text fields, as paragraphs."""
    articles = []
    for path in sorted(factbook.glob("*/*.json")):
        if path.parent.name == "meta":
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        name = _plain(data.get("Government", {}).get("Country name", {})
                      .get("conventional short form", {}).get("text", "")) or path.stem
        paragraphs, size = [], 0
        for keys, value in _strings(data):
            text = _plain(value)
            if len(text) >= FACTBOOK_MIN_CHARS and keys[-1] in ("text", "note"):
                label = keys[-2] if keys[-1] == "text" else f"{keys[-2]} (note)"
                paragraphs.append(f"{label}: {text}")
                size += len(paragraphs[-1])
                if size >= FACTBOOK_ARTICLE_CHARS:
                    break
        if paragraphs:
            articles.append(f"{name}\n\n" + "\n\n".join(paragraphs))
    return "\n\n\n".join(articles)


def code(stdlib: Path, modules: tuple[str, ...] = STDLIB_MODULES, limit: int = CODE_BYTES) -> str:
    parts, size = [], 0
    for name in modules:
        parts.append(f"# {name}\n" + (stdlib / name).read_text(encoding="utf-8"))
        size += len(parts[-1])
        if size >= limit:
            break
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--peps", "--factbook", "--shakespeare", "--stdlib", "--fiction", "--out"):
        p.add_argument(flag, type=Path, required=True)
    p.add_argument("--eval-out", type=Path, default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out, "technical", technical(args.peps))
    _write(args.out, "encyclopedic", encyclopedic(args.factbook))
    _write(args.out, "code", code(args.stdlib))
    _write(args.out, "dialogue", args.shakespeare.read_text(encoding="utf-8"))
    _write(args.out, "fiction", args.fiction.read_text(encoding="utf-8-sig"))
    if args.eval_out:
        args.eval_out.mkdir(parents=True, exist_ok=True)
        _write(args.eval_out, "eval-code", code(args.stdlib, EVAL_STDLIB_MODULES, EVAL_BYTES))
        _write(args.eval_out, "eval-technical", technical(args.peps, 1, EVAL_BYTES))


if __name__ == "__main__":
    main()
