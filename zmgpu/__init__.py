"""zmgpu: a GPU job scheduler over ZeroMQ (master, node agents, command line)."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import zmgpu` stays cheap for the CLI and the daemons.
    if name in ("Client", "ClientError"):
        from . import client

        return getattr(client, name)
    raise AttributeError(name)
