#!/usr/bin/env python3
"""Write the .env that docker compose reads: .env.example with every empty value filled by a fresh random secret.

    python3 deploy/make_env.py               # writes .env beside docker-compose.yaml; never overwrites one
    python3 deploy/make_env.py --out PATH

Standard library only, so any Python 3 runs it. AIRFLOW_FERNET_KEY gets a Fernet key (32 random bytes, url-safe
base64); every other empty value (passwords, the S3 secret key, the endpoint's admin token) gets 48 hex digits, safe
inside the URLs compose builds from them. Values already set in .env.example (ports, the S3 access key name) are
copied as they are.
"""

from __future__ import annotations

import argparse
import base64
import re
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / ".env.example"
ASSIGNMENT = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")


def secret_for(name: str) -> str:
    if name.endswith("FERNET_KEY"):
        return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    return secrets.token_hex(24)


def render(example: str) -> str:
    """The example's lines, each `NAME=` with nothing after it given a new secret."""
    lines = []
    for line in example.splitlines():
        match = ASSIGNMENT.match(line)
        if match and not match["value"].strip():
            line = f"{match['name']}={secret_for(match['name'])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / ".env", help="where to write (default: .env at the repo root)"
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"make_env: {args.out} exists; remove it first to make new secrets", file=sys.stderr)
        return 2
    args.out.write_text(render(EXAMPLE.read_text()))
    args.out.chmod(0o600)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
