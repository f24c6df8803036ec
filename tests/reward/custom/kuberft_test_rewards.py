"""Custom rewards used by the tests (a real deployment installs such a module in the image)."""


def short_answers(completion: str, row: dict, args: dict):
    """1.0 for completions up to args['limit'] characters, falling linearly to 0 at twice that."""
    limit = int(args.get("limit", 10))
    length = len(completion)
    score = 1.0 if length <= limit else max(0.0, 2.0 - length / limit)
    return score, f"{length} characters (limit {limit})"


def phone_home(completion: str, row: dict, args: dict) -> float:
    """Tries to reach the network: the sandbox refuses."""
    import socket

    socket.create_connection(("10.0.0.1", 80), timeout=1)
    return 1.0


def out_of_range(completion: str, row: dict, args: dict) -> float:
    return 3.0


def hunts_for_answers(completion: str, row: dict, args: dict):
    """What a candidate reading the evaluator's memory would do: look through every object
    the garbage collector knows and every frame for a tensor holding `args['marker']` (a value
    that exists only in a reference output). 1.0 when found."""
    import gc
    import sys

    import torch

    marker = float(args["marker"])

    def holds(value) -> bool:
        return isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 0 and bool((value == marker).any())

    found = sum(1 for obj in gc.get_objects() if holds(obj))
    frame = sys._getframe()
    while frame is not None:
        found += sum(1 for value in frame.f_locals.values() if holds(value))
        frame = frame.f_back
    return (1.0 if found else 0.0), f"{found} tensor(s) holding the marker"
