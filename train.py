"""Entry point: `python train.py [group=option ...] [key=value ...]`. See README."""

from sftlab.train import main

if __name__ == "__main__":
    main()
