"""cellnb: fine-tune CNNs on cell and tissue images and explain their validation loss per sample.

The package contains all the logic, and the notebooks in ``notebooks/`` call it and add narrative.
"""

__version__ = "0.1.0"

DEFAULT_CLASSES = ("negative", "positive")
