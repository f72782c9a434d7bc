"""`llmaas openapi`: print (or write) the service's OpenAPI document, as a running service serves at /openapi.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmaas.service.app import openapi_spec


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmaas openapi", description=__doc__)
    p.add_argument("--out", type=Path, help="write here instead of stdout (the repo keeps docs/openapi.json)")
    args = p.parse_args(argv)
    text = json.dumps(openapi_spec(), indent=2, sort_keys=True) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0
