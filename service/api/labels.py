"""Names and tags given as query parameters (`POST /v1/runs?name=…&tag=…`): checked as a PATCH body is."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from graddiag.service.store.labels import Labels


def query_labels(name: str | None, tags: list[str] | None) -> Labels:
    """The labels from `?name=` and `?tag=`; a bad one is a 422 located in the query."""
    try:
        return Labels.model_validate({"name": name, "tags": tags or []})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError(
            [
                {**error, "loc": ("query", "tag" if error["loc"][0] == "tags" else "name", *error["loc"][1:])}
                for error in errors
            ]
        ) from None
