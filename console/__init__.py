"""The console layer: the `mixer-label` command line, one module per command.

The top layer (console > flows > pipeline > models): it parses flags, calls the library and
prints; `console.errors` is the only place where an error becomes a message and an exit code.
"""
