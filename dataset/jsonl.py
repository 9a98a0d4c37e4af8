"""Read a jsonl file into Arrow, and name the exact line when one is wrong.

The happy path never touches lines in Python: `datasets` parses the file with
Arrow's JSON reader (memory-mapped, cached on disk) and the dataset classes check
each record while they tokenize it. Arrow skips blank lines and also accepts a few
layouts that are not one-object-per-line, so a row index is not a line number.
Whenever something is wrong we therefore re-read the file line by line, apply the
same record check, and report the first bad line. That slow scan only ever runs on
a file that is already known to be broken.
"""

import codecs
import contextlib
import json
import logging
from pathlib import Path

import datasets
import pyarrow

FIX = "fix or delete that line"  # the usual end of a bad-line message


class DataError(ValueError):
    """A problem with the user's data or tokenizer, stated in one line with the fix."""


def load_jsonl(path, columns, record_problem, skip_bad_lines=False, optional=(), nested=False):
    """The records of `path` as an Arrow-backed `datasets.Dataset` holding at most `columns`.

    `nested`: the columns hold JSON whose shape varies from line to line (chats with tool calls, whose arguments
    are any object): each value is kept exactly as written, where Arrow's reader would merge every line's keys
    into one struct (or give up on a key that is a string on one line and an object on another).

    `record_problem(record)` returns None for a usable record, else a sentence saying
    what is wrong and how to fix it; here it only serves to find the first bad line.

    Lines that cannot be parsed at all make Arrow give up on the whole file: that is a
    DataError naming the first bad line, or with `skip_bad_lines` the readable lines are
    loaded and each unreadable one becomes an all-null record for the caller's record
    check to drop and count. Checking the records themselves is the caller's job.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a jsonl file" if path.is_dir() else "does not exist"
        raise DataError(f"{path} {what}; pass --data_path with a jsonl file (scripts/prepare_data.py makes them)")
    if next(parse_lines(path), None) is None:  # the readers below fail on a file of no records without saying which
        raise DataError(f"{path} is empty: write one JSON object per line")
    if nested:
        return _records_by_line(path, columns)
    try:
        with _quiet_logger("datasets.packaged_modules.json.json"):  # it logs the Arrow error we are about to explain
            # parse_agent_traces=False: a user's jsonl is read as it is, never reinterpreted as agent logs.
            records = datasets.load_dataset("json", data_files=str(path), split="train", parse_agent_traces=False)
        # Arrow's JSON reader lets invalid UTF-8 through inside strings; find it now, not mid-tokenizing.
        records.data.table.validate(full=True)
    except (datasets.exceptions.DatasetGenerationError, pyarrow.ArrowException, ValueError, StopIteration):
        bad = None if skip_bad_lines else first_bad_line(path, record_problem)
        if bad:
            raise bad from None
        # Skipping bad lines, or no line is bad: Arrow gave up on something no line breaks (a key this file does not
        # use holding a number in one block of lines and a string in a later one). Read line by line instead.
        records = _records_by_line(path, columns)
    for column in optional:  # a key no line has is a column of nulls
        if column not in records.column_names:
            records = records.add_column(column, [None] * len(records))
    missing = [column for column in columns if column not in records.column_names]
    if missing:
        raise bad_line_error(path, record_problem, f"no record has the key {missing}")
    return records.select_columns(list(columns))


def _records_by_line(path, columns):
    """Every line parsed in Python, each column kept as the JSON it holds; an unreadable line is all nulls."""
    return datasets.Dataset.from_generator(
        _readable_records,
        # mtime and size make an edited file miss the cache instead of reusing stale rows
        gen_kwargs={"path": str(path), "columns": columns, "version": (path.stat().st_mtime_ns, path.stat().st_size)},
        features=datasets.Features({column: datasets.Json() for column in columns}),
    )


@contextlib.contextmanager
def _quiet_logger(name):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def bad_line_error(path, record_problem, fallback):
    """A DataError for the first bad line of `path`; `fallback` says what went wrong if no line is to blame."""
    return first_bad_line(path, record_problem) or DataError(f"{path}: {fallback}")


def first_bad_line(path, record_problem):
    """A DataError naming the first bad line of `path`; None if every line is good."""
    for line_number, record, problem in parse_lines(path):
        problem = problem or record_problem(record)
        if problem:
            return DataError(f"{path}, line {line_number}: {problem}")
    return None


def line_number(path, record_index):
    """The line of `path` that holds record `record_index` (records are its non-blank lines)."""
    for index, (number, _, _) in enumerate(parse_lines(path)):
        if index == record_index:
            return number
    return None


def _readable_records(path, columns, version):
    """Every non-blank line as a record restricted to `columns`; an unreadable line as all nulls."""
    for _, record, problem in parse_lines(path):
        # As JSON text: a Json column stores a string as it comes and parses it back, so "391" would read as 391.
        yield {column: json.dumps(None if problem else record.get(column), ensure_ascii=False) for column in columns}


def parse_lines(path):
    """Yield (1-based line number, record, problem) for each non-blank line; record is None when problem is set."""
    with open(path, "rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue  # Arrow skips blank lines too, so they are not records
            record, problem = _parse_line(raw)
            yield line_number, record, problem


def _parse_line(raw):
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as error:
        return None, f"invalid UTF-8 at byte {error.start} of the line; re-encode the file as UTF-8 (e.g. iconv -f GBK -t UTF-8)"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg}: column {error.colno}); each line must hold one complete JSON object, {FIX}"
    except (ValueError, RecursionError) as error:  # a number of over 4,300 digits; objects nested thousands deep
        return None, f"not readable JSON ({error.__class__.__name__}: {str(error).split(';')[0]}); {FIX}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {json_type(record)}; {FIX}"
    try:
        # json accepts lone UTF-16 surrogates like "\ud800" that Arrow and the tokenizer cannot hold
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return None, f"contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); {FIX}"
    return record, None


def json_type(value):
    """The JSON name of a parsed value's type, for error messages."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)
