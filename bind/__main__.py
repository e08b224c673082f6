"""``python -m bind ...`` is ``bindkit ...`` (and lets ``torchrun -m bind run RECIPE`` work)."""

from .cli import main

if __name__ == "__main__":
    main()
