"""Analysis subcommands of the CLI (locate, ...); registered into refimpl.cli.COMMANDS."""
