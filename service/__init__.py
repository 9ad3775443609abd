"""The gradstore REST service."""
