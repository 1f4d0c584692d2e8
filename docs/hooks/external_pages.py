"""mkdocs hook: add pages whose sources live outside ``docs/`` without copying or linking them.

* ``tutorials/*.ipynb`` (the repository's notebooks) become ``tutorials/<name>.ipynb`` pages, rendered by
  mkdocs-jupyter (``execute: false``);
* ``CHANGELOG.md`` becomes ``changelog.md``.

The files are added as mkdocs File objects that point at their real paths, so a
build always shows the current notebooks and changelog, and ``docs/`` holds no copies that could go stale. The
hook runs before mkdocs-jupyter's own ``on_files``, which turns notebook files into pages.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
CHANGELOG = ROOT / "CHANGELOG.md"


@event_priority(100)  # before mkdocs-jupyter (priority 0), which wraps .ipynb files into notebook pages
def on_files(files: Files, config) -> Files:
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        # A plain File whose source folder is the repository root: `tutorials/<name>.ipynb` is then both the page
        # path and the real relative path. (mkdocs-jupyter's wrapper needs `src_dir`, which File.generated lacks.)
        _add(files, File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT), dest_dir=config.site_dir,
                         use_directory_urls=config.use_directory_urls))
    if not CHANGELOG.is_file():
        raise FileNotFoundError(f"{CHANGELOG} does not exist")
    _add(files, File.generated(config, "changelog.md", abs_src_path=str(CHANGELOG)))
    return files


def _add(files: Files, file: File) -> None:
    if files.get_file_from_path(file.src_uri) is not None:
        raise ValueError(f"docs/{file.src_uri} shadows {file.abs_src_path}; delete the copy in docs/")
    files.append(file)
