"""MkDocs hooks: the benchmark results files served with the site, and the API reference tidied.

The pages cite figures by relative links to ``../benchmarks/results/<file>``, which work where
the Markdown is read (a clone, a code host) but leave MkDocs' ``docs/`` folder. This hook adds
every file of ``benchmarks/results/`` to the site under ``benchmarks/results/`` and points those
links there, so that ``mkdocs build --strict`` checks them like any other link and the built site
carries the cited JSON, tables and plots. Nothing is copied into the source tree.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SITE_FOLDER = "benchmarks/results/"

# a Markdown link or image target that climbs out of docs/ into benchmarks/results/
_LINK = re.compile(r"\]\((?P<ups>(?:\.\./)+)(?P<rest>benchmarks/results/[^)\s]+)\)")


def on_files(files, config):
    for path in sorted(RESULTS.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            # the tables (.md) become pages of their own, reached from the pages that cite them
            files.append(File.generated(config, SITE_FOLDER + path.name, abs_src_path=str(path), inclusion=InclusionLevel.NOT_IN_NAV))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # folders between docs/ and the page

    def to_site(match: re.Match) -> str:
        if len(match["ups"]) // 3 != depth + 1:  # not a link from docs/ to the repository root
            return match[0]
        return "](" + posixpath.join("../" * depth, match["rest"]) + ")"

    return _LINK.sub(to_site, markdown)


# The docstrings are written for Sphinx-style readers: ``:func:`name```, ``:class:`~a.b.C```,
# "Example::". In the rendered reference, show the names as code without the role markers.
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):(?=<code>)")
_TILDE = re.compile(r"<code>~(?:[\w]+\.)*(\w+)</code>")
_LITERAL_INTRO = re.compile(r"::(?=</p>)")


def on_page_content(html, page, config, files):
    if not page.file.src_uri.startswith("api/"):
        return html
    return _LITERAL_INTRO.sub(":", _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", html)))
