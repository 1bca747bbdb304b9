"""Entry point: `python train.py [group=option ...] [key=value ...]` (the same as `sftlab-train`)."""

from sftlab.cli.train import main

if __name__ == "__main__":
    main()
