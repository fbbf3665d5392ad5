"""mkdocs hook: links from docs/ to files elsewhere in the repository.

The pages link to benchmark results, configs and tests with paths such as
`../benchmarks/results/checkpoint_io.md`, which work when the Markdown is read in the
repository but lie outside the site. This hook checks that each such target exists in the
repository (a missing one is a warning, so `mkdocs build --strict` fails) and renders the link as
the repository path in code (`benchmarks/results/checkpoint_io.md`), which names the file
without a link that would 404 on the site. Links inside docs/ are left to mkdocs' own checks.
Standalone: it imports nothing from scaletrain.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.plugins.scaletrain_links")

_LINK = re.compile(r"(!?)\[([^\]\n]*)\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")


def _outside_target(url: str, page_src: str) -> str | None:
    """The repository-relative path a relative link points to, when it leaves docs/."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I) or url.startswith(("/", "#")):
        return None
    path = url.split("#", 1)[0]
    joined = posixpath.normpath(posixpath.join("docs", posixpath.dirname(page_src), path))
    return None if joined == "docs" or joined.startswith("docs/") else joined


def on_page_markdown(markdown: str, page, config, files) -> str:
    repo = Path(config["docs_dir"]).resolve().parent
    out, in_fence = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        if in_fence or "](" not in line:
            out.append(line)
            continue

        def rewrite(m: re.Match) -> str:
            bang, text, url = m.groups()
            target = _outside_target(url, page.file.src_uri)
            if target is None:
                return m.group(0)
            if target.startswith("../") or not (repo / target).exists():
                log.warning("Doc file '%s' contains a link '%s', but the target '%s' does not exist "
                            "in the repository.", page.file.src_uri, url, target)
                return m.group(0)
            code = f"`{target}`"
            if bang or text.strip("`") in (target, url, posixpath.basename(target)):
                return code
            return f"{text} ({code})"

        out.append(_LINK.sub(rewrite, line))
    return "\n".join(out)
