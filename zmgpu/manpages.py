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


_READ_BY_UNIT = "Settings read by the systemd unit (see \\fB\\-\\-config\\fR); command\\-line options beat the file."

PAGES = (
    PageSpec(
        "zmgpu", 1, "zmgpu.cli.main", "submit, watch and cancel GPU jobs on a zmgpu cluster",
        (("files", _file_entry("~/.config/zmgpu/client.yaml",
                               "Client settings, read when neither \\fB\\-\\-config\\fR nor \\fBZMGPU_CONFIG\\fR "
                               "names another file (keys as in conf/client.yaml).")),)),
    PageSpec(
        "zmgpu-master", 8, "zmgpu.master.app", "the zmgpu scheduler daemon",
        (("files", _file_entry("/etc/zmgpu/master.yaml", _READ_BY_UNIT)),
         ("signals", "SIGTERM and SIGINT stop the master cleanly (exit status 0)."))),
    PageSpec(
        "zmgpu-node", 8, "zmgpu.node.app", "the zmgpu node agent that runs jobs on a machine's GPUs",
        (("files", _file_entry("/etc/zmgpu/node.yaml", _READ_BY_UNIT)),
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
