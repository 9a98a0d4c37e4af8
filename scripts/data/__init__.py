"""Building the training corpora: fetch the packages (fetch), parse them (sources), split and write jsonl (pipeline)."""


class DataError(Exception):
    """A failure the user can fix; main() prints it as one line instead of a traceback."""
