"""A request refused before anything happens, naming the parameter to fix."""

from __future__ import annotations


class Refused(ValueError):
    """The request cannot be carried out as asked; nothing was changed.

    The message starts with the parameter's name, as pydantic's validation errors do, so
    an operator knows which form field to fix.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}; nothing was changed")
        self.field = field
        self.problem = problem
