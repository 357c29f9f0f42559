"""One module per ``dorafit`` subcommand (see ``dorafit.cli``)."""
