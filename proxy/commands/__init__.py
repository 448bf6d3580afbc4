"""One module per `ollamux` subcommand."""
