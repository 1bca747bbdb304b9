"""The commands. Importing this package silences the warnings no user can act on (`sftlab.cli.quiet`)
before any command module loads torch, peft or Lightning."""

from sftlab.cli.quiet import quiet

quiet()
