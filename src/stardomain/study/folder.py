"""Which folders a study may write into: its own (it carries the study's mark), an empty one, or with
--force any folder. A folder that merely holds a file named `results.json` or `plan.json` is not taken
for a study: a run replaces results.json, report.md, report.html and plots/ in its folder, so a user's
own folder with such files would lose them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..checkpoint import atomic_write_text, check_writable
from ..errors import UserError
from .lock import LOCK_NAME

MARK_NAME = ".stardomain-study"
MARK_TEXT = "a stardomain study folder (stardomain run); its files are written and replaced by the study\n"


def _regular_text(path: Path, limit: int = 1 << 20) -> str | None:
    """The text of a regular file (links not followed), None for anything else or too big."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return path.read_text(errors="replace")
    except OSError:
        return None


def is_study_folder(root: Path) -> bool:
    """Ours: it carries the mark, or holds nothing but a study's lock (empty, or its holder's line), or (a
    folder from before the mark) a plan.json of a study's shape."""
    if _regular_text(root / MARK_NAME) == MARK_TEXT:
        return True
    if os.listdir(root) == [LOCK_NAME]:
        line = _regular_text(root / LOCK_NAME)
        return line is not None and (line == "" or line.startswith("pid "))
    try:
        plan = json.loads(_regular_text(root / "plan.json") or "null")
    except ValueError:
        return False
    return isinstance(plan, dict) and set(plan) == {"tasks", "layout"} and isinstance(plan["tasks"], list)


def check_study_folder(root: Path, force: bool = False) -> None:
    """The study folder is DIR itself: refuse a file, and a non-empty folder that is not a study folder
    (a run writes report.md, plots/, ... into it) unless `force`; refuse a place it cannot write."""
    if root.is_symlink() and not root.exists():
        raise UserError(f"--out {root} is a broken symbolic link; give a folder path")
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file; a study writes a folder (give a folder path)")
    if not force and root.is_dir() and any(root.iterdir()) and not is_study_folder(root):
        raise UserError(f"--out {root} is a folder with other files in it, not a study folder (it lacks the "
                        f"{MARK_NAME} a study writes); choose another --out or pass --force to write the study "
                        "into it")
    check_writable(root / MARK_NAME, "--out")


def mark_study_folder(root: Path) -> None:
    """Write the mark (the folder exists and was checked): later runs know the folder is a study's."""
    if _regular_text(root / MARK_NAME) != MARK_TEXT:
        atomic_write_text(root / MARK_NAME, MARK_TEXT)
