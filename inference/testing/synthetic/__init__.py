"""Synthetic multi-hospital prostate mp-MRI studies as scanners and radiologists would leave them."""
