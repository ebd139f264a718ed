"""The teacher's error: one line naming the file or field and the fix (a lorkd-pl user error)."""

from __future__ import annotations


class TeacherError(ValueError):
    """A teacher cannot be loaded or does not fit the tasks."""
