"""Man pages generated from the real argument parsers: ``python -m zmgpu.manpages [--check]``.

``man/zmgpu.1``, ``man/zmgpu-master.8`` and ``man/zmgpu-node.8`` come from each program's ``get_parser()``
through argparse-manpage; they are committed and installed by setup.cfg.  Rendering is byte-for-byte
reproducible (no date, a fixed line width, a fixed program name), so ``--check`` and the test suite can
regenerate the pages in memory and fail when they drift from the parsers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import __version__

MAN_DIR = Path(__file__).resolve().parent.parent / "man"

# argparse wraps text to the terminal width ($COLUMNS). A fixed width keeps the pages identical everywhere; a
# very wide one leaves the filling to man itself, where wrapping at 80 would split "--simulate-gpus" at a hyphen.
RENDER_COLUMNS = "100000"


@dataclass(frozen=True)
class PageSpec:
    """One man page: which program, from which parser, with which extra sections (roff text)."""

    prog: str
    section: int
    module: str  # the module whose get_parser() describes the program
    summary: str  # the one-line NAME description
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.prog}.{self.section}"


def _roff(text: str) -> str:
    """``text`` with roff's special characters escaped; an escaped hyphen is never a line-break point."""
    return text.replace("\\", "\\\\").replace("-", "\\-")


def _file_entry(path: str, text: str) -> str:
    """A FILES section entry (``text`` is roff)."""
    return f".TP\n.I {_roff(path)}\n{text}"


def _steps(*steps: str) -> str:
    """A numbered list of plain-text steps."""
    return "\n".join(f".IP {number}. 4\n{_roff(step)}" for number, step in enumerate(steps, 1))


_READ_BY_UNIT = "Settings read by the systemd unit (see \\fB\\-\\-config\\fR); command\\-line options beat the file."

#: The secure set-up of a lab (a master gpu-master, nodes node001-node003, users with the same accounts
#: everywhere), as each program's page tells its part of it; README.md has the whole story.
_LAB = "For a lab of one master (gpu-master) and three nodes (node001 to node003), as root unless said otherwise:"
_MASTER_STEPS = _steps(
    "zmgpu keygen master --dir /etc/zmgpu; chown zmgpu:zmgpu /etc/zmgpu/master.key_secret (the unit runs the "
    "master as zmgpu). Give /etc/zmgpu/master.key, the public half, to the nodes and the users.",
    "On each node: zmgpu keygen node001 --dir /etc/zmgpu (see zmgpu-node(8)); each user: zmgpu keygen user "
    "(see zmgpu(1)). Each prints its public key.",
    "List them on the master, one 'NAME PUBLIC_KEY' line each: the node ids in /etc/zmgpu/authorized_nodes, "
    "the user names in /etc/zmgpu/authorized_users.",
    "In /etc/zmgpu/master.yaml: host: 0.0.0.0, secret_key_file: /etc/zmgpu/master.key_secret, and admins: "
    "[the admins' user names].",
    "systemctl enable --now zmgpu-master. After editing a list: systemctl reload zmgpu-master (SIGHUP).")
_NODE_STEPS = _steps(
    "zmgpu keygen node001 --dir /etc/zmgpu, under the node's id; its public key goes into the master's "
    "/etc/zmgpu/authorized_nodes as 'node001 PUBLIC_KEY'.",
    "Copy the master's public key to /etc/zmgpu/master.key.",
    "In /etc/zmgpu/node.yaml: master_host: gpu-master, secret_key_file: /etc/zmgpu/node001.key_secret, "
    "master_public_key_file: /etc/zmgpu/master.key.",
    "systemctl enable --now zmgpu-node: the unit runs the agent as root, which starts each job as the user "
    "who submitted it (uid, gid and groups from this node's user database); a user unknown here ends the job "
    "FAILED. Jobs never run as root unless the master's allow_root_jobs says so.")
_USER_STEPS = _steps(
    "zmgpu keygen user: writes ~/.config/zmgpu/user.key and user.key_secret (mode 0600).",
    "Copy the master's public key (/etc/zmgpu/master.key on the master) to ~/.config/zmgpu/master.key.",
    "Give the public key zmgpu keygen printed to the admin, who lists it under your user name in the "
    "master's authorized_users. From then on every zmgpu command uses both files by itself.")

PAGES = (
    PageSpec(
        "zmgpu", 1, "zmgpu.cli.main", "submit, watch and cancel GPU jobs on a zmgpu cluster",
        (("secure setup", f"A master with keys answers only users whose key it lists. {_LAB}\n{_USER_STEPS}"),
         ("files", "\n".join([
             _file_entry("~/.config/zmgpu/client.yaml",
                         "Client settings, read when neither \\fB\\-\\-config\\fR nor \\fBZMGPU_CONFIG\\fR "
                         "names another file (keys as in conf/client.yaml)."),
             _file_entry("~/.config/zmgpu/user.key_secret", "Your CURVE secret key, for a master with keys."),
             _file_entry("~/.config/zmgpu/master.key", "The master's public key.")])))),
    PageSpec(
        "zmgpu-master", 8, "zmgpu.master.app", "the zmgpu scheduler daemon",
        (("secure setup", f"Beyond loopback the master needs keys (or \\fB\\-\\-insecure\\fR). {_LAB}\n"
                          f"{_MASTER_STEPS}"),
         ("files", "\n".join([
             _file_entry("/etc/zmgpu/master.yaml", _READ_BY_UNIT),
             _file_entry("/etc/zmgpu/master.key_secret", "The master's CURVE secret key (secret_key_file)."),
             _file_entry("/etc/zmgpu/authorized_nodes", "The node keys let in: 'NODE_ID PUBLIC_KEY' lines."),
             _file_entry("/etc/zmgpu/authorized_users", "The user keys let in: 'USER PUBLIC_KEY' lines.")])),
         ("signals", "SIGTERM and SIGINT stop the master cleanly (exit status 0). SIGHUP re\\-reads "
                     "authorized_nodes and authorized_users; a key taken off them stops working at once."))),
    PageSpec(
        "zmgpu-node", 8, "zmgpu.node.app", "the zmgpu node agent that runs jobs on a machine's GPUs",
        (("secure setup", f"With a master that has keys, each node has a key pair of its own. {_LAB}\n"
                          f"{_NODE_STEPS}"),
         ("files", "\n".join([
             _file_entry("/etc/zmgpu/node.yaml", _READ_BY_UNIT),
             _file_entry("/etc/zmgpu/NODE_ID.key_secret", "This node's CURVE secret key (secret_key_file)."),
             _file_entry("/etc/zmgpu/master.key", "The master's public key (master_public_key_file).")])),
         ("signals", "SIGTERM and SIGINT stop the agent cleanly (exit status 0) without stopping its "
                     "jobs; a restarted agent adopts them again."))),
)


@contextlib.contextmanager
def _fixed_terminal(prog: str):
    """Make argparse's output independent of the caller: fixed width, and ``prog`` as the program name."""
    saved_columns, saved_argv = os.environ.get("COLUMNS"), sys.argv
    os.environ["COLUMNS"] = RENDER_COLUMNS
    sys.argv = [prog]  # argparse derives the default prog (and each subcommand's) from argv[0]
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved_columns


def render(page: PageSpec) -> str:
    """The roff text of ``page``, generated from its module's ``get_parser()``."""
    from argparse_manpage.manpage import Manpage

    with _fixed_terminal(page.prog):
        parser = importlib.import_module(page.module).get_parser()
        parser.prog = page.prog
        man = Manpage(parser)
        man.date = ""  # a generation date would make the committed page differ from a fresh one every day
        man.source = f"zmgpu {__version__}"
        man.manual = "zmgpu manual"
        man.section = page.section
        man.description = page.summary
        for heading, content in (("synopsis", _synopsis(man.synopsis)), *page.extra, ("see also", _see_also(page))):
            man.add_section(heading, "=", content)
        return str(man)


def _synopsis(words: list[str]) -> str:
    """The usage line, escaped and unhyphenated, so man never splits an option such as --pub-port."""
    return f".B {_roff(words[0])}\n.nh\n{_roff(' '.join(words[1:]))}\n.hy"


def _see_also(page: PageSpec) -> str:
    """Roff references to the other zmgpu pages."""
    others = (other for other in PAGES if other.prog != page.prog)
    return ",\n".join(f".BR {_roff(other.prog)} ({other.section})" for other in others)


def get_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m zmgpu.manpages``."""
    parser = argparse.ArgumentParser(
        prog="python -m zmgpu.manpages",
        description="Write the man pages generated from the zmgpu parsers, or check that they are current.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a page differs from its parser (default: write the pages)")
    parser.add_argument("--man-dir", type=Path, default=MAN_DIR,
                        help="directory holding the pages (default: man/ in the source tree)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write or check every page; the exit status is 1 when a check finds a stale page."""
    args = get_parser().parse_args(argv)
    prog = "zmgpu.manpages"
    try:
        rendered = {page.filename: render(page) for page in PAGES}
    except ImportError as exc:
        hint = " (install the test extras: pip install -e '.[test]')" if exc.name == "argparse_manpage" else ""
        print(f"{prog}: {exc}{hint}", file=sys.stderr)
        return 1
    stale = [name for name, text in rendered.items() if _read(args.man_dir / name) != text]
    if args.check:
        for name in stale:
            print(f"{prog}: {args.man_dir / name} does not match its parser; run: python -m zmgpu.manpages",
                  file=sys.stderr)
        return 1 if stale else 0
    args.man_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.man_dir / name).write_text(rendered[name])
        print(f"wrote {args.man_dir / name}")
    return 0


def _read(path: Path) -> str | None:
    """The file's text, or None when it does not exist yet."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
