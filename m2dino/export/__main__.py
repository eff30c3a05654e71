"""`python -m m2dino.export`: the command line of m2dino.export.cli."""
from m2dino.export.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
