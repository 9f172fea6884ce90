"""Data: video datasets for training and evaluation (``davis``: DAVIS / DAVIS Static for ``eval.py``)."""
