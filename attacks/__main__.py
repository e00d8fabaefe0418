"""``python -m attacks``: print every registered attack with its kind, needs and params."""
from . import describe

if __name__ == "__main__":
    print(describe())
