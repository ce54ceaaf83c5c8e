"""The one registry of task names; the CLI, the API and the dashboard all read `TASKS`."""

from __future__ import annotations

import inspect
from typing import Any

from backend.errors import InvalidParameterError, NotFoundError
from backend.tasks.base import Task
from backend.tasks.docstring import DocstringTask
from backend.tasks.greater_than import GreaterThanTask
from backend.tasks.ioi import IOITask
from backend.tasks.jsonl import JsonlTask
from backend.tasks.modadd import ModAddTask

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (IOITask, DocstringTask, GreaterThanTask, JsonlTask, ModAddTask)
}


def get_task(name: str, **options: Any) -> Task:
    """The task `name` built with `options` (e.g. corruption="s2", path="pairs.jsonl")."""
    cls = TASKS.get(name)
    if cls is None:
        raise NotFoundError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        # Report bad or missing options as user input, not as a crash.
        raise InvalidParameterError(f"task {name!r}: {exc}") from None
    return cls(**options)


def list_tasks() -> list[dict[str, str]]:
    """One entry per task: name, description, metric."""
    return [{"name": n, "description": c.description, "metric": c.metric_kind} for n, c in TASKS.items()]
