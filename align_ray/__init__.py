"""align-ray: ALIGN on Ray."""
__version__ = "0.1.0"
