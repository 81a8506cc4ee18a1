"""The ``zmgpu`` command line: ``main.py`` parses and dispatches, one module per sub-command."""
