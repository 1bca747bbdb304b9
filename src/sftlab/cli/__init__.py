"""The commands. Importing this package silences the warnings no user can act on (`sftlab.quiet`)
before any command module loads torch, peft or Lightning."""

from sftlab.quiet import quiet

quiet()
