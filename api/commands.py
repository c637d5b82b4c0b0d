"""`vaultsync serve` and `vaultsync token`: the CLI side of the API.

Kept here so that cli.py only registers them, and so that FastAPI and
uvicorn are imported only by the commands that need them.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from vaultsync.config import load_config

token_app = typer.Typer(help="Bearer tokens for the REST API (stored hashed in the config).")


def serve(
    config: Annotated[Path, typer.Argument(help="The volume's TOML config file.")],
    from_target: Annotated[
        str, typer.Option("--from", help="Serve the points this target holds (standalone).")
    ],
    listen: Annotated[
        str | None, typer.Option(help="HOST:PORT (default: api.listen, 127.0.0.1:8470).")
    ] = None,
) -> None:
    """Serve the REST restore API and web page standalone, from one target's bucket.

    To serve the live volume as well, set `[api] enabled = true` and mount it.
    """
    from .server import serve_standalone

    cfg = load_config(config)
    passphrase = cfg.passphrase() if cfg.volume.encryption else None
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve_standalone(cfg, from_target, passphrase, listen))


@token_app.command("new")
def token_new(
    name: Annotated[str, typer.Option(help="A name for the token in the config.")] = "client",
    scope: Annotated[str, typer.Option(help="read or admin.")] = "read",
) -> None:
    """Make a random token: printed once, with the config lines that hold only its hash."""
    from .auth import hash_token, new_token

    if scope not in ("read", "admin"):
        raise typer.BadParameter("--scope must be read or admin")
    token = new_token()
    print(f"token (give it to the client; it is not stored anywhere): {token}", file=sys.stderr)
    print(f'[[api.tokens]]\nname = "{name}"\nscope = "{scope}"\nhash = "{hash_token(token)}"')


@token_app.command("hash")
def token_hash() -> None:
    """Read a token from stdin and print the hash line for the config."""
    from .auth import hash_token

    token = sys.stdin.readline().strip()
    try:
        print(f'hash = "{hash_token(token)}"')
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
