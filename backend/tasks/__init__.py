"""Tasks: prompt pairs (clean, corrupted, answer, distractors) and the metric M (DESIGN 5, 9)."""

from backend.tasks.base import (
    METRIC_KINDS,
    PromptBatch,
    PromptPair,
    Task,
    last_logits,
    metric,
    metric_columns,
    metric_from_columns,
    tokenize_pairs,
)
from backend.tasks.registry import TASKS, get_task, list_tasks

__all__ = [
    "METRIC_KINDS",
    "PromptBatch",
    "PromptPair",
    "TASKS",
    "Task",
    "get_task",
    "last_logits",
    "list_tasks",
    "metric",
    "metric_columns",
    "metric_from_columns",
    "tokenize_pairs",
]
