"""Placeholder: being written (see issue 4)."""


def add_arguments(p) -> None:
    p.add_argument("file")


def run(args) -> int:
    raise NotImplementedError
