"""One module per `ollamux` subcommand: `ollamux X` is ``proxy/commands/X.py``.

Each module has ``NAME`` (the subcommand), ``register(subparsers)``, which adds the subcommand's
parser, and ``run(args)``, which does it and raises an OllamuxError when it cannot (``proxy/cli.py``
turns errors into exit codes). A module is imported for every command, since the parser is built
whole, so its top-level imports stay light: the rest is imported inside ``run``. Where the work is
a library's that other code uses too, the command module is thin and says which library it calls.

Two names differ from their subcommand, as no two modules share a name:

``config_check.py``   `ollamux config check` (``proxy/config.py`` is the config itself)
``instances_cli.py``  `ollamux instances` (``proxy/instances/`` is how instances come to exist)
"""
