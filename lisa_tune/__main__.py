"""Run the ``lisa-tune`` command line as ``python -m lisa_tune``, the form that ``accelerate launch -m`` starts."""

from lisa_tune.cli import entry_point

if __name__ == "__main__":
    entry_point()
