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
