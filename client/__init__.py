"""Python SDK for the gradstore REST service."""
