"""JSON-lines files for the batch tests: written one record a line, read back split on \\n only
(a completion may hold U+0085 or U+2028 raw, which str.splitlines() would split on)."""
import json


def write_jsonl(path, records):
    """Records (dicts, or raw strings written as they are) one a line; returns path."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]
