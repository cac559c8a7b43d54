"""Part of the compressor package (see ARCHITECTURE.md)."""
