"""Selective-scan operators: a plain reference and fast implementations behind one entry point."""

from .selective_scan import selective_scan, selective_scan_ref

__all__ = ["selective_scan", "selective_scan_ref"]
