"""What a run learns: the task decides the targets a dataset reads, the model's output size, which losses fit,
the metrics and pictures of each split, and what predict.py prints. One class per option of the `task` group
(configs/task/), classification by default (docs/configs.md "Tasks")."""

from trainer.tasks.base import Task
from trainer.tasks.classification import Classification
from trainer.tasks.embedding import Embedding
from trainer.tasks.multilabel import MultiLabel
from trainer.tasks.regression import Regression

__all__ = ["Classification", "Embedding", "MultiLabel", "Regression", "Task", "task_from_state", "task_name"]

TASKS = {cls.name: cls for cls in (Classification, MultiLabel, Regression, Embedding)}


def task_name(state: dict | None, where: str = "the checkpoint") -> str:
    """The name of the task a checkpoint records (`state["task"]`; none: classification, as every checkpoint
    written before tasks)."""
    from trainer.errors import UserError

    if state is None:
        return Classification.name
    name = state.get("name") if isinstance(state, dict) else None
    if name not in TASKS:
        raise UserError(f"{where}: its task {name!r} is none of {', '.join(TASKS)}")
    return name


def task_from_state(state: dict | None, where: str = "the checkpoint") -> Task:
    """The task a checkpoint records, rebuilt from this project's classes only, with its fitted values (a
    regression's target scale, an embedding's class centroids)."""
    name = task_name(state, where)
    return Classification() if state is None else TASKS[name].from_state(state, where)
