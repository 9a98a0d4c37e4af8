"""Tools a model may call: plain Python functions, their JSON schemas, and running a call.

`--tools calculator,my_tools.py` offers the built-in calculator and every public function defined in
`my_tools.py`. A function's signature (with type hints) and its Google-style docstring (a description, then an
`Args:` line per parameter) become the schema the model sees, through `transformers.utils.get_json_schema`:

    def weather(city: str) -> str:
        \"\"\"Today's weather in a city.

        Args:
            city: the city's name
        \"\"\"
        return "sunny"

A call's result goes back to the model as text: a string as it is, anything else as JSON, an exception as
{"error": "..."}; a call to a tool that does not exist, or with arguments the function does not take, is told so
the same way, so the model sees what went wrong and the conversation goes on.
"""

import ast
import importlib.util
import inspect
import json
import operator
from pathlib import Path

from simpleeval import InvalidExpression, SimpleEval
from transformers.utils import get_json_schema

from dataset import DataError
from dataset.chat import results_framing


# What a calculator shows: every operation's result is at most this large and an expression at most this long, so
# no request holds the process (the server's engine and its event loop with it) while Python multiplies huge numbers.
LARGEST = 10**1000
LONGEST_EXPRESSION = 1000


def bounded_power(base, exponent):
    """`base ** exponent`, refused before it is computed when it could be huge."""
    if abs(exponent) > 64 or abs(base) > 10**12:
        raise ValueError(f"{base} ** {exponent} is too large for this calculator")
    return base**exponent


def bounded(operation):
    def apply(*operands):
        value = operation(*operands)
        if isinstance(value, int) and abs(value) > LARGEST:
            raise ValueError("a number in it is too large for this calculator (above 10**1000)")
        return value
    return apply


ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: bounded_power, ast.USub: operator.neg,
              ast.UAdd: operator.pos}


# The docstring below is the tool's schema, which the demo's tool chats (prepare_data) train the model on: a change to
# its words changes every prompt that offers the calculator, and what a tool-tuned model does with it.
def calculator(expression: str) -> str:
    """Evaluate arithmetic, such as (17 + 4) * 23.

    Args:
        expression: numbers joined by + - * / % ** and parentheses
    """
    if len(expression) > LONGEST_EXPRESSION:
        raise ValueError(f"the expression is {len(expression):,} characters; this calculator takes at most "
                         f"{LONGEST_EXPRESSION:,}")
    evaluator = SimpleEval(operators={kind: bounded(operation) for kind, operation in ARITHMETIC.items()},
                           functions={}, names={})
    try:
        value = evaluator.eval(expression.replace("×", "*").replace("÷", "/"))
    except (InvalidExpression, KeyError):  # an operator, name or function it does not take (^, <<, <, open)
        value = None
    except RecursionError:
        raise ValueError("the expression nests too deeply for this calculator") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{expression!r} is not arithmetic: use + - * / // % ** and parentheses")
    return str(round(value, 10) if isinstance(value, float) else value)


BUILT_IN = {"calculator": calculator}


class Tools:
    """Named functions with their schemas; `run(call)` executes an OpenAI-format tool call."""

    def __init__(self, functions):
        self.functions = dict(functions)
        self.schemas = [_schema(name, function) for name, function in self.functions.items()]

    def __bool__(self):
        return bool(self.functions)

    def run(self, call):
        """The text a tool call's result goes back as (never raises for the call's sake)."""
        function = call.get("function", call)
        name, arguments = function.get("name"), function.get("arguments", {})
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
            if name not in self.functions:
                raise LookupError(f"no tool named {name!r}; the tools are {', '.join(self.functions)}")
            if not isinstance(arguments, dict):
                raise TypeError("the arguments must be a JSON object")
            inspect.signature(self.functions[name]).bind(**arguments)
            result = self.functions[name](**arguments)
        except Exception as error:  # whatever the model or the tool got wrong is the model's to read
            return json.dumps({"error": f"{type(error).__name__}: {error}"}, ensure_ascii=False)
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)


    def results_ids(self, tokenizer, reply):
        """Run a reply's calls; the token ids the chat template writes after the reply's end token: the results'
        turn, then the next answer's header. For a decoder that goes on from the tokens it has."""
        answer = {"role": "assistant", "content": reply["content"], "tool_calls": reply["tool_calls"]}
        results = [{"role": "tool", "content": self.run(call)} for call in reply["tool_calls"]]
        return tokenizer(results_framing(tokenizer, answer, results), add_special_tokens=False).input_ids


def load_tools(spec):
    """`Tools` from a comma-separated list of built-in names and Python files (empty `spec`: none)."""
    functions = {}
    for part in filter(None, (part.strip() for part in (spec or "").split(","))):
        if part in BUILT_IN:
            functions[part] = BUILT_IN[part]
        elif part.endswith(".py"):
            functions.update(_functions_in(Path(part)))
        else:
            raise DataError(f"--tools {part}: neither a built-in tool ({', '.join(BUILT_IN)}) nor a .py file")
    return Tools(functions)


def _functions_in(path):
    if not path.is_file():
        raise DataError(f"--tools {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"tinymind_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise DataError(f"--tools {path}: importing it failed ({type(error).__name__}: {error})") from None
    functions = {name: value for name, value in vars(module).items()
                 if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")}
    if not functions:
        raise DataError(f"--tools {path}: defines no public function (one not starting with _) to offer")
    for name, function in functions.items():
        _schema(name, function, path)
    return functions


def _schema(name, function, path=None):
    try:
        schema = get_json_schema(function)
        schema["function"].pop("return", None)  # the model reads the result; describing it costs prompt tokens
        return schema
    except Exception as error:
        where = f"{path}: " if path else ""
        raise DataError(f"--tools {where}function {name} has no schema ({error}); give it type hints and a docstring "
                        "with a description and an Args: line for each parameter") from None
