"""Why input cannot become a forget request, or a request cannot change as asked: the errors the
API answers 409 or 422 with."""

from collections.abc import Iterable

# How many offending ids an error message lists before it only counts the rest.
LISTED_IDS = 20


class RequestValidationProblem(ValueError):
    """Input that cannot become a forget request. `field` names the request field at fault, in
    the body unless `location` says otherwise (e.g. "header")."""

    def __init__(
        self, field: str, message: str, *, error_type: str, status_code: int = 422, location: str = "body"
    ):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.error_type = error_type
        self.status_code = status_code
        self.location = location


class RequestConflict(RequestValidationProblem):
    """Valid input that collides with the state of what it names (rows already there, a request
    past the point where it may change)."""

    def __init__(self, field: str, message: str, *, error_type: str, location: str = "body"):
        super().__init__(field, message, error_type=error_type, status_code=409, location=location)


def format_ids(ids: Iterable[int]) -> str:
    ordered = sorted(set(ids))
    shown = ", ".join(str(i) for i in ordered[:LISTED_IDS])
    more = len(ordered) - LISTED_IDS
    return f"{shown} and {more} more" if more > 0 else shown
