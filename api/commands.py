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

from vaultsync.config import ApiToken, load_config

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
    from pydantic import ValidationError

    from .auth import hash_token, new_token

    if scope not in ("read", "admin"):
        raise typer.BadParameter("--scope must be read or admin")
    token = new_token()
    try:  # the config's own rules, so what is printed is what `load_config` accepts
        entry = ApiToken(name=name, scope=scope, hash=hash_token(token))  # type: ignore[arg-type]
    except ValidationError:
        raise typer.BadParameter(
            f"--name {toml_string(name)}: a token's name is 1-63 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        ) from None
    print(f"token (give it to the client; it is not stored anywhere): {token}", file=sys.stderr)
    print(
        f"[[api.tokens]]\nname = {toml_string(entry.name)}\nscope = {toml_string(entry.scope)}\n"
        f"hash = {toml_string(entry.hash)}"
    )


def toml_string(value: str) -> str:
    """`value` as a TOML basic string: quotes, backslashes and control characters escaped.

    What is printed for the config must parse as the value it shows, whatever
    the value holds; a name with a quote or a newline broke the config file.
    """
    out = []
    for ch in value:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 0xD800 <= code <= 0xDFFF:
            out.append("\ufffd")  # a byte of the command line that was not UTF-8: no TOML form
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@token_app.command("hash")
def token_hash() -> None:
    """Read a token from stdin and print the hash line for the config."""
    from .auth import hash_token

    token = sys.stdin.readline().rstrip("\r\n")  # the line's end only: the token is exact
    try:
        print(f'hash = "{hash_token(token)}"')
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
