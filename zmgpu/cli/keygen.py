"""``zmgpu keygen``: write a CURVE key pair for a master, a node or a user."""

from __future__ import annotations

import argparse

from ..keys import CONFIG_DIR, PUBLIC_SUFFIX, SECRET_SUFFIX, load_public_key, write_key_pair

HELP = "write a CURVE key pair for a master, a node or a user"
DESCRIPTION = (
    f"Write NAME{PUBLIC_SUFFIX} (the public key, to hand out) and NAME{SECRET_SUFFIX} (the secret key, mode "
    "0600, never to leave this machine) in DIR, in ZeroMQ's certificate format, and print the public key.  "
    "A master with a secret key (secret_key_file in its YAML) admits only the nodes and users whose public "
    "keys its authorized_nodes and authorized_users files list, one 'NAME PUBLIC_KEY' line each.  A user "
    f"runs 'zmgpu keygen user' (the client looks for {CONFIG_DIR}/user{SECRET_SUFFIX} and the master's key "
    f"as {CONFIG_DIR}/master{PUBLIC_SUFFIX}) and hands user{PUBLIC_SUFFIX} to the admin.  Existing files "
    "are kept unless --force is given.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu keygen``."""
    parser.add_argument("name", metavar="NAME",
                        help="the files' base name, e.g. master, the node id, or user (letters, digits, '.', "
                             "'_' and '-')")
    parser.add_argument("--dir", default=CONFIG_DIR, metavar="DIR",
                        help=f"where to write them; created with mode 0700 if missing (default: {CONFIG_DIR})")
    parser.add_argument("--force", action="store_true", default=None,
                        help="replace existing key files (default: refuse, and keep them)")


def run(args: argparse.Namespace) -> int:
    """Write the pair and say where, with the public key to list on the master."""
    public_path, secret_path = write_key_pair(args.dir, args.name, bool(args.force))
    print(f"wrote {public_path} (public) and {secret_path} (secret, mode 0600)")
    print(f"public key: {load_public_key(public_path).decode()}")
    return 0
