"""CurveZMQ keys for the device protocol: who may talk to a device server, and which server a client trusts.

By default both sides derive their key pairs from the one shared secret a lab already sets,
``$ASTRAORA_DEVICE_TOKEN`` (or a token file): a server key pair and a client key pair, each the
Curve25519 key of a 32-byte secret hashed from the token with a label of its own. A client that
knows the token therefore knows the server's public key (so it cannot be fooled by another
server) and holds the one client key the server accepts. Labs that want a key per client use key
files in ZeroMQ's certificate format instead (``python -m astraora.remote.keys <folder> <name>``).

No secret is ever printed or logged: objects here show public keys only.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from astraora.errors import ConfigError
from astraora.remote.token import TOKEN_ENV, read_token

SERVER_LABEL, CLIENT_LABEL = b"astraora-server", b"astraora-client"


def derive_keypair(token: str, label: bytes) -> tuple[bytes, bytes]:
    """(public, secret) Z85 Curve keys derived from ``token`` for one role (``label``)."""
    secret = z85.encode(hashlib.blake2b(token.encode("utf-8"), digest_size=32, person=label).digest())
    return zmq.curve_public(secret), secret


def load_keypair(path: str, key: str) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate file; ``key`` names the config key in errors."""
    public, secret = _load(path, key)
    if not secret:
        raise ConfigError(
            f"{key}={path} holds no secret key; give the .key_secret file made by `python -m astraora.remote.keys`."
        )
    return public, secret


def load_public(path: str, key: str) -> bytes:
    """The public key of a ``.key`` (or ``.key_secret``) certificate file."""
    return _load(path, key)[0]


def _load(path: str, key: str) -> tuple[bytes, bytes | None]:
    file = Path(str(path)).expanduser()
    if not file.is_file():
        raise ConfigError(f"{key}={path} is not a file.")
    try:
        public, secret = zmq.auth.load_certificate(file)
        if len(public) != 40 or (secret is not None and len(secret) != 40):
            raise ValueError
        z85.decode(public)
    except (ValueError, OSError, UnicodeDecodeError, KeyError):
        raise ConfigError(
            f"{key}={path} is not a ZeroMQ certificate file (make one with `python -m astraora.remote.keys`)."
        ) from None
    return public, secret


def load_authorized(folder: str, key: str) -> set[bytes]:
    """The public keys of every ``*.key`` file in ``folder`` (the clients a server accepts)."""
    path = Path(str(folder)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={folder} is not a folder.")
    keys = {load_public(str(file), key) for file in sorted(path.glob("*.key"))}
    if not keys:
        raise ConfigError(f"{key}={folder} holds no client public keys (*.key files).")
    return keys


@dataclass(frozen=True)
class ServerKeys:
    """The server's key pair and the client public keys it accepts."""

    public: bytes
    secret: bytes = field(repr=False)
    authorized: frozenset[bytes]
    per_client: bool  # the clients hold keys of their own (sessions are then bound to them)

    @classmethod
    def from_token(cls, token: str) -> ServerKeys:
        public, secret = derive_keypair(token, SERVER_LABEL)
        return cls(public, secret, frozenset({derive_keypair(token, CLIENT_LABEL)[0]}), per_client=False)

    @classmethod
    def from_config(cls, key_file: str | None, client_keys_dir: str | None, token_file: str | None) -> ServerKeys:
        """From ``server.key_file`` / ``server.client_keys_dir``; what they leave out comes from the token."""
        token = read_token(token_file, "server.token_file") if not (key_file and client_keys_dir) else None
        public, secret = load_keypair(key_file, "server.key_file") if key_file else derive_keypair(token, SERVER_LABEL)
        authorized = (
            load_authorized(client_keys_dir, "server.client_keys_dir")
            if client_keys_dir
            else {derive_keypair(token, CLIENT_LABEL)[0]}
        )
        return cls(public, secret, frozenset(authorized), per_client=bool(client_keys_dir))


@dataclass(frozen=True)
class ClientKeys:
    """The client's key pair and the server public key it trusts."""

    public: bytes
    secret: bytes = field(repr=False)
    server: bytes
    hint: str  # what to check when the server refuses these keys

    @classmethod
    def from_token(cls, token: str) -> ClientKeys:
        public, secret = derive_keypair(token, CLIENT_LABEL)
        return cls(public, secret, derive_keypair(token, SERVER_LABEL)[0], f"wrong {TOKEN_ENV}?")

    @classmethod
    def from_config(
        cls, key_file: str | None, server_key: str | None, token_file: str | None, token: str | None = None
    ) -> ClientKeys:
        """From ``device.key_file`` / ``device.server_key``; what they leave out comes from the token."""
        if not (key_file and server_key):
            token = token or read_token(token_file, "device.token_file")
        public, secret = load_keypair(key_file, "device.key_file") if key_file else derive_keypair(token, CLIENT_LABEL)
        server = load_public(server_key, "device.server_key") if server_key else derive_keypair(token, SERVER_LABEL)[0]
        hint = (
            f"wrong {TOKEN_ENV}?"
            if not (key_file or server_key)
            else "is this client's public key in server.client_keys_dir, and device.server_key the server's?"
        )
        return cls(public, secret, server, hint)


def main(argv: list[str] | None = None) -> None:
    """``python -m astraora.remote.keys <folder> <name>``: a new key pair <folder>/<name>.key (public,
    to hand out) and <folder>/<name>.key_secret (keep it on this machine)."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("folder")
    parser.add_argument("name")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / f"{args.name}.key").exists() or (folder / f"{args.name}.key_secret").exists():
        parser.error(f"{folder / args.name}.key already exists; choose another name")
    public_file, secret_file = zmq.auth.create_certificates(folder, args.name)
    Path(secret_file).chmod(0o600)
    print(f"public key: {public_file} (give it to the other side)\nsecret key: {secret_file} (keep it here)")


if __name__ == "__main__":
    main()
